// AVX2 kernels on layout v2 (format.h), for x86 CPUs without AVX-512: the
// scheme of rsmm_avx512.cc with 256-bit registers. A 16-row tile is two halves
// of 8 rows (tile bytes 0..31 = rows 0..7, 32..63 = rows 8..15), each half's rows
// in the 8 lanes of a register; tokens in tiles of up to 4, so the group scales
// apply to whole registers and no horizontal sum is ever needed.
//
// Per half tile: one 32-byte load per active slice; bit pair i of those bytes,
// moved to bit pair (m - 1 - e) by a 16-bit shift, masked and or-ed over slices
// e < m, gives Q(m) of columns 4i .. 4i+3 for the 8 rows as unsigned bytes (the
// int8 kernel builds Q(2) of quads i and i+2 together in the two nibbles, then
// splits them).
// rsmm_i8_16x4__avx2: int8 mode, exact int32 dots: vpmaddubsw (u8 codes x s8
//   activations broadcast per column quad, pairs summed into saturating int16),
//   vpaddw, vpmaddwd. A pair is at most 2 * Q * 128, so for Q < 16 (k <= 2) the
//   four quads of a tile sum in int16 (<= 15360) before one vpmaddwd, for Q < 64
//   (k = 3) two quads (<= 32256). Q(4) (up to 255) would saturate: it is taken as
//   16 Q(2) of slices 1, 2 (vpmaddwd by 16) + Q(2) of slices 3, 4 — exact.
// rsmm_f32_16x4__avx2: exact float mode; byte b of each dword (vpshufb) widened
//   to float, one FMA per (column, token, half) with the broadcast activation;
//   one or two tokens keep 2 accumulator chains per half each.
// Per group g and token: y += s1 * (s_k/s1 * (dot * dot_scale + xsum/2)) - (s1 z1)
// * xsum, with s1 and s1 z1 from the tile parameters. Bias loads and y stores are
// masked (vmaskmovps): rows past N are never read or written.
// Both: group_size % 16 == 0, k <= 4, any N, unaligned pointers; bytes of slices
// k+1..S never read.
#include <immintrin.h>

#include <cstring>

#include "../tiles.h"
#include "mobiq/format.h"
#include "mobiq/kernels.h"

#define MOBIQ_AVX2 __attribute__((target("avx2,fma")))

namespace mobiq {
namespace {

constexpr int kHalfRows = kTileRows / 2;
constexpr int kHalfBytes = kTileBytes / 2;

// Bit pair `From` of every byte moved to bit pair `To` (other bits are garbage until masked).
template <int From, int To>
MOBIQ_AVX2 inline __m256i move_pair(__m256i v) {
  if constexpr (From > To) return _mm256_srli_epi16(v, 2 * (From - To));
  else if constexpr (From < To) return _mm256_slli_epi16(v, 2 * (To - From));
  else return v;
}

// Q(M) of columns 4I .. 4I+3 of a half tile, 8 rows x 4 bytes, from the slice bytes v[0..M)
// (most significant slice first). Nibbles (M <= 2, I < 2): also Q(M) of columns 4I+8 .. 4I+11
// in the high nibbles.
template <int M, int I, bool Nibbles = false, int E = 0>
MOBIQ_AVX2 inline __m256i codes(const __m256i* v, __m256i q = __m256i{}) {
  if constexpr (E == M) {
    return q;
  } else {
    constexpr int to = M - 1 - E, mask = (3 << (2 * to)) * (Nibbles ? 0x11 : 1);
    const __m256i part = _mm256_and_si256(move_pair<I, to>(v[E]), _mm256_set1_epi8(static_cast<char>(mask)));
    return codes<M, I, Nibbles, E + 1>(v, E == 0 ? part : _mm256_or_si256(q, part));
  }
}

constexpr int chains(int nt) { return nt <= 2 ? 2 : 1; }

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The KS slices' bytes of half tile h, slice-1 tile at p.
template <int KS>
MOBIQ_AVX2 inline void load_half(const uint8_t* p, size_t plane, int h, __m256i* v) {
  for (int e = 0; e < KS; ++e)
    v[e] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + e * plane + h * kHalfBytes));
}

// Adds the group's dot products (per half and token, rows in lanes) to the running outputs.
template <int NT>
MOBIQ_AVX2 inline void group_epilogue(const RsmmArgs& a, const int32_t* tok, int64_t tile, int64_t g, float ratio,
                                      const __m256 (&dot)[2][NT], const float* dot_scale, __m256 (&out)[2][NT]) {
  const int64_t groups = a.K / a.group_size;
  for (int h = 0; h < 2; ++h) {
    const __m256 s1 = _mm256_loadu_ps(a.tile_scales + (tile * groups + g) * kTileRows + h * kHalfRows);
    const __m256 o1 = _mm256_loadu_ps(a.tile_offsets + (tile * groups + g) * kTileRows + h * kHalfRows);
    for (int j = 0; j < NT; ++j) {
      const float xsum = a.x_group_sums[tok[j] * groups + g];
      const __m256 t =
          _mm256_fmadd_ps(dot[h][j], _mm256_set1_ps(ratio * dot_scale[j]), _mm256_set1_ps(0.5f * ratio * xsum));
      out[h][j] = _mm256_fnmadd_ps(o1, _mm256_set1_ps(xsum), _mm256_fmadd_ps(s1, t, out[h][j]));
    }
  }
}

// y (+ bias) of rows n .. min(n + 16, N) for NT tokens.
template <int NT>
MOBIQ_AVX2 inline void store_tile(const RsmmArgs& a, const int32_t* tok, int64_t n, const __m256 (&out)[2][NT]) {
  for (int h = 0; h < 2; ++h) {
    const int64_t r = n + h * kHalfRows, rows = a.N - r;
    if (rows <= 0) break;
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows < kHalfRows ? static_cast<int>(rows) : kHalfRows),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 bias = a.bias ? _mm256_maskload_ps(a.bias + r, m) : _mm256_setzero_ps();
    for (int j = 0; j < NT; ++j) _mm256_maskstore_ps(a.y + tok[j] * a.N + r, m, _mm256_add_ps(out[h][j], bias));
  }
}

MOBIQ_AVX2 inline __m256i dot_pair(__m256i q0, __m256i x0, __m256i q1, __m256i x1) {
  return _mm256_add_epi16(_mm256_maddubs_epi16(q0, x0), _mm256_maddubs_epi16(q1, x1));
}

// acc += W * (each token's dot product of the 16 columns with Q(M) of slices v[0..M)), exact
// for M <= 3: four quads summed in int16 when Q < 16, two when Q < 64 (see the top).
template <int M, int W, int NT>
MOBIQ_AVX2 inline void i8_part(const __m256i* v, const __m256i (&x)[4][NT], __m256i* acc) {
  const __m256i w = _mm256_set1_epi16(W);
  __m256i q0, q1, q2, q3;
  if constexpr (M == 2) {  // two quads per register, then split the nibbles
    const __m256i u = codes<2, 0, true>(v), t = codes<2, 1, true>(v), low = _mm256_set1_epi8(0x0F);
    q0 = _mm256_and_si256(u, low), q2 = _mm256_and_si256(_mm256_srli_epi16(u, 4), low);
    q1 = _mm256_and_si256(t, low), q3 = _mm256_and_si256(_mm256_srli_epi16(t, 4), low);
  } else {
    q0 = codes<M, 0>(v), q1 = codes<M, 1>(v), q2 = codes<M, 2>(v), q3 = codes<M, 3>(v);
  }
  for (int j = 0; j < NT; ++j) {
    const __m256i lo = dot_pair(q0, x[0][j], q1, x[1][j]), hi = dot_pair(q2, x[2][j], q3, x[3][j]);
    if constexpr (M <= 2) {
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_add_epi16(lo, hi), w));
    } else {
      acc[j] = _mm256_add_epi32(acc[j], _mm256_add_epi32(_mm256_madd_epi16(lo, w), _mm256_madd_epi16(hi, w)));
    }
  }
}

// One half tile's 16 columns for NT tokens (x: their four int8 activations per column quad,
// broadcast); Q(4) = 16 Q(2)[slices 1, 2] + Q(2)[slices 3, 4].
template <int KS, int NT>
MOBIQ_AVX2 inline void i8_half(const __m256i* v, const __m256i (&x)[4][NT], __m256i* acc) {
  if constexpr (KS < 4) {
    i8_part<KS, 1>(v, x, acc);
  } else {
    i8_part<2, 16>(v, x, acc);
    i8_part<2, 1>(v + 2, x, acc);
  }
}

// Byte B of every dword, zero-extended and converted to float.
template <int B>
MOBIQ_AVX2 inline __m256 byte_to_float(__m256i q) {
  constexpr int z = static_cast<int>(0x80808000u) + B;  // vpshufb: byte 4d + B of the lane, then three zeros
  return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(q, _mm256_setr_epi32(z, z + 4, z + 8, z + 12, z, z + 4, z + 8, z + 12)));
}

template <int NT, int I, int B, int A>
MOBIQ_AVX2 inline void f32_column(const float* const* x, const __m256i (&q)[2], __m256 (&acc)[A][2][NT]) {
  const __m256 w[2] = {byte_to_float<B>(q[0]), byte_to_float<B>(q[1])};
  for (int j = 0; j < NT; ++j) {
    const __m256 xb = _mm256_set1_ps(x[j][4 * I + B]);
    for (int h = 0; h < 2; ++h) acc[(4 * I + B) % A][h][j] = _mm256_fmadd_ps(w[h], xb, acc[(4 * I + B) % A][h][j]);
  }
}

// Columns 4I .. 4I+3 of both half tiles for NT tokens (x: their activations at the tile's
// first column); column 4I+B goes to accumulator chain (4I+B) % A.
template <int KS, int NT, int I, int A>
MOBIQ_AVX2 inline void f32_columns(const float* const* x, const __m256i (&v)[2][KS], __m256 (&acc)[A][2][NT]) {
  const __m256i q[2] = {codes<KS, I>(v[0]), codes<KS, I>(v[1])};
  f32_column<NT, I, 0, A>(x, q, acc);
  f32_column<NT, I, 1, A>(x, q, acc);
  f32_column<NT, I, 2, A>(x, q, acc);
  f32_column<NT, I, 3, A>(x, q, acc);
}

// One row tile (rows n .. n+15) for NT tokens reading KS slices.
template <int KS, int NT>
MOBIQ_AVX2 void i8_row_tile(const RsmmArgs& a, const int32_t* tok, int64_t n) {
  const int64_t groups = a.K / a.group_size, tile = n / kTileRows;
  const size_t plane = slice_bytes(a.N, a.K);
  const uint8_t* tiles = tile_at(a.slices, a.K, n, 0);
  __m256 out[2][NT];
  for (auto& half : out)
    for (auto& o : half) o = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[2][NT];
    for (auto& half : acc)
      for (auto& s : half) s = _mm256_setzero_si256();
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += kTileCols) {
      const uint8_t* p = tiles + (c / kTileCols) * kTileBytes;
      __m256i x[4][NT];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NT; ++j) x[i][j] = _mm256_set1_epi32(load4(a.xq + tok[j] * a.K + c + 4 * i));
      for (int h = 0; h < 2; ++h) {
        __m256i v[KS];
        load_half<KS>(p, plane, h, v);
        i8_half<KS, NT>(v, x, acc[h]);
      }
    }
    __m256 dot[2][NT];
    float dot_scale[NT];
    for (int j = 0; j < NT; ++j) {
      for (int h = 0; h < 2; ++h) dot[h][j] = _mm256_cvtepi32_ps(acc[h][j]);
      dot_scale[j] = a.xq_scale[tok[j] * groups + g];
    }
    group_epilogue<NT>(a, tok, tile, g, step_ratio(KS), dot, dot_scale, out);
  }
  store_tile<NT>(a, tok, n, out);
}

template <int KS, int NT>
MOBIQ_AVX2 void f32_row_tile(const RsmmArgs& a, const int32_t* tok, int64_t n) {
  constexpr int A = chains(NT);
  const int64_t groups = a.K / a.group_size, tile = n / kTileRows;
  const size_t plane = slice_bytes(a.N, a.K);
  const uint8_t* tiles = tile_at(a.slices, a.K, n, 0);
  float ones[NT];
  for (auto& o : ones) o = 1.0f;
  __m256 out[2][NT];
  for (auto& half : out)
    for (auto& o : half) o = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[A][2][NT];
    for (auto& chain : acc)
      for (auto& half : chain)
        for (auto& s : half) s = _mm256_setzero_ps();
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += kTileCols) {
      const uint8_t* p = tiles + (c / kTileCols) * kTileBytes;
      __m256i v[2][KS];
      load_half<KS>(p, plane, 0, v[0]);
      load_half<KS>(p, plane, 1, v[1]);
      const float* x[NT];
      for (int j = 0; j < NT; ++j) x[j] = a.x + tok[j] * a.K + c;
      f32_columns<KS, NT, 0, A>(x, v, acc);
      f32_columns<KS, NT, 1, A>(x, v, acc);
      f32_columns<KS, NT, 2, A>(x, v, acc);
      f32_columns<KS, NT, 3, A>(x, v, acc);
    }
    __m256 dot[2][NT];
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < NT; ++j) {
        dot[h][j] = acc[0][h][j];
        for (int i = 1; i < A; ++i) dot[h][j] = _mm256_add_ps(dot[h][j], acc[i][h][j]);
      }
    group_epilogue<NT>(a, tok, tile, g, step_ratio(KS), dot, ones, out);
  }
  store_tile<NT>(a, tok, n, out);
}

template <int NT, bool Int8>
void tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t) {
  switch (k) {
    case 1: Int8 ? i8_row_tile<1, NT>(a, tok, n0) : f32_row_tile<1, NT>(a, tok, n0); break;
    case 2: Int8 ? i8_row_tile<2, NT>(a, tok, n0) : f32_row_tile<2, NT>(a, tok, n0); break;
    case 3: Int8 ? i8_row_tile<3, NT>(a, tok, n0) : f32_row_tile<3, NT>(a, tok, n0); break;
    default: Int8 ? i8_row_tile<4, NT>(a, tok, n0) : f32_row_tile<4, NT>(a, tok, n0); break;
  }
}

// Row tiles outermost: a prefill reads each row tile's slice bytes from cache for every token tile.
template <bool Int8>
void run(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kTileRows)
    run_tiles<tile<1, Int8>, tile<2, Int8>, tile<3, Int8>, tile<4, Int8>>(a, tokens, num_tokens, k, n,
                                                                           n + kTileRows < n1 ? n + kTileRows : n1);
}

}  // namespace

void rsmm_i8_16x4__avx2(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  run<true>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_f32_16x4__avx2(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                         int64_t n1) {
  run<false>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
