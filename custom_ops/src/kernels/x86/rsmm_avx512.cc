// AVX-512 VNNI kernels on layout v2 (format.h): the 16 rows of a row tile sit in
// the 16 lanes of a register, tokens in tiles of up to 4, so group scales apply to
// whole registers and no horizontal sum is ever needed. Every product is an
// integer vpdpbusd of code bytes with signed activation bytes.
//
// Code bytes (Quads<KS>): per 16 x 16 weight tile, one 64-byte load per active
// slice; a few 16-bit shifts and bitwise selects (vpternlogd) give, for each
// column quad i (columns 4i .. 4i+3), a register of 16 rows x 4 bytes holding
// Q(k) times a power of two fixed per quad ("class" shift, undone exactly on the
// int32 sums by an arithmetic shift):
//   k = 1, int8, 1-2 tokens: quad i at x4^i, masks only (4 ands per tile: vector
//             shifts cost as much as a vpdpbusd on this class of core);
//   k = 1, 2: nibbles — quads 0, 1 at x1, quads 2, 3 at x16 (1 shift + 4 ands
//             per tile for k = 1; 2 shifts, 2 selects, 4 ands for k = 2);
//   k = 3, 4: bytes 16 Q12 + Q34 of the slice pairs (1,2) and (3,4) — k = 3 with
//             q4 = 0, i.e. 4 Q(3); 8 shifts and 8 selects for k = 4.
// rsmm_i8_16x4__avx512vnni: int8 mode, one vpdpbusd per (quad, token).
// rsmm_f32_16x4__avx512vnni: exact mode. Activations as 23-bit block floating point
//   (per token and group: x = scale (d2 2^16 + d1 2^8 + d0), signed digits, |x| error
//   <= 2^-23 max|x_group|, below float32 rounding of the sums), three vpdpbusd per
//   (quad, token), exact int32 sums combined in float per group.
// Per group g and token: y += s1 * (s_k/s1 * (dot + xsum/2)) - (s1 z1) * xsum, with
// s1 and s1 z1 from the tile parameters (int8 mode: half precision in units of the row's
// scale, which the store multiplies in). One token keeps 4 independent accumulator
// chains per column tile and takes two column tiles at a time (k <= 3), two tokens 2
// chains each, so vpdpbusd latency is hidden. Exact mode takes tokens two at a time.
// Both: group_size % 16 == 0, k <= 4, bytes of slices k+1..S never read.
#include <immintrin.h>

#include "../tiles.h"
#include "mobiq/format.h"
#include "mobiq/kernels.h"

#define MOBIQ_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

namespace mobiq {
namespace {

constexpr int kSelect = 0xE4;  // vpternlogd: c ? a : b, bit by bit

MOBIQ_AVX512VNNI inline __m512i bytes(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
MOBIQ_AVX512VNNI inline __m512i select(__m512i a, __m512i b, int mask) {
  return _mm512_ternarylogic_epi32(a, b, bytes(mask), kSelect);
}

// Two slices as nibbles: .lo has quads 0 (low nibble) and 2 (high), .hi quads 1 and 3, each nibble
// 4 qa + qb. Without b (k = 1 or 3) the b codes are 0.
struct Nibbles {
  __m512i lo, hi;
};
MOBIQ_AVX512VNNI inline Nibbles nibbles(__m512i a, const __m512i* b) {
  if (b) return {select(_mm512_slli_epi16(a, 2), *b, 0xCC), select(a, _mm512_srli_epi16(*b, 2), 0xCC)};
  return {_mm512_and_si512(_mm512_slli_epi16(a, 2), bytes(0xCC)), _mm512_and_si512(a, bytes(0xCC))};
}

// Code bytes q[i] of quad i for KS slices, q[i] = Q(KS) << shift(i) (see the header). Wide: for
// k = 1, four classes from masks alone (no shift; vector shifts are slow), for callers with
// accumulators to spare.
template <int KS, bool Wide>
struct Quads {
  static constexpr bool kMasksOnly = KS == 1 && Wide;
  static constexpr int kClasses = kMasksOnly ? 4 : KS <= 2 ? 2 : 1;
  static constexpr int shift(int i) { return kMasksOnly ? 2 * i : KS <= 2 ? (i >= 2 ? 4 : 0) : KS == 3 ? 2 : 0; }

  MOBIQ_AVX512VNNI static inline void build(const __m512i* v, __m512i q[4]) {
    if constexpr (kMasksOnly) {
      for (int i = 0; i < 4; ++i) q[i] = _mm512_and_si512(v[0], bytes(3 << (2 * i)));
    } else if constexpr (KS == 1) {
      const __m512i odd = _mm512_srli_epi16(v[0], 2);
      q[0] = _mm512_and_si512(v[0], bytes(0x03));
      q[1] = _mm512_and_si512(odd, bytes(0x03));
      q[2] = _mm512_and_si512(v[0], bytes(0x30));
      q[3] = _mm512_and_si512(odd, bytes(0x30));
    } else if constexpr (KS == 2) {
      const Nibbles n = nibbles(v[0], &v[1]);
      q[0] = _mm512_and_si512(n.lo, bytes(0x0F));
      q[1] = _mm512_and_si512(n.hi, bytes(0x0F));
      q[2] = _mm512_and_si512(n.lo, bytes(0xF0));
      q[3] = _mm512_and_si512(n.hi, bytes(0xF0));
    } else {
      const Nibbles top = nibbles(v[0], &v[1]);
      const Nibbles low = nibbles(v[2], KS == 4 ? &v[3] : nullptr);
      q[0] = select(_mm512_slli_epi16(top.lo, 4), low.lo, 0xF0);
      q[1] = select(_mm512_slli_epi16(top.hi, 4), low.hi, 0xF0);
      q[2] = select(top.lo, _mm512_srli_epi16(low.lo, 4), 0xF0);
      q[3] = select(top.hi, _mm512_srli_epi16(low.hi, 4), 0xF0);
    }
  }
};

// Two code-generation pins (GCC 12; together 18-33 % faster for k = 1..4 in L2, measured): dot4 keeps each
// accumulator in place with the activation broadcast folded in (the intrinsic form renamed the
// accumulators through register copies every step), and load_codes keeps a loaded slice register
// live (otherwise each use re-read the 64 bytes as a memory operand of its shift).
// acc += codes . (the 4 activation bytes at p, in every lane)
MOBIQ_AVX512VNNI inline void dot4(__m512i& acc, __m512i codes, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*reinterpret_cast<const int32_t*>(p)));
}
MOBIQ_AVX512VNNI inline __m512i load_codes(const uint8_t* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm("" : "+v"(v));
  return v;
}

// Accumulator slots: A per (row tile, token, plane), A >= the quads' classes, quad i -> slot
// i * A / 4, so every slot holds one class and one token has enough independent vpdpbusd chains.
template <class Q, int NT>
constexpr int slots() {
  const int chains = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  return chains > Q::kClasses ? chains : Q::kClasses;
}

// Exact int32 sum of the slots of one token, class shifts undone.
template <class Q, int A>
MOBIQ_AVX512VNNI inline __m512i slot_sum(const __m512i* slot) {
  __m512i s = _mm512_srai_epi32(slot[0], Q::shift(0));
  for (int h = 1; h < A; ++h) s = _mm512_add_epi32(s, _mm512_srai_epi32(slot[h], Q::shift(h * 4 / A)));
  return s;
}

// Adds one group's dot products (per token, rows in lanes) to the running outputs; int8 mode: in
// units of the row scales (the half-precision tile parameters, one 64-byte line).
template <bool Int8>
MOBIQ_AVX512VNNI inline void group_epilogue(const RsmmArgs& a, const int32_t* tok, int nt, int64_t tile, int64_t g,
                                            float ratio, const __m512* dot, __m512* out) {
  const int64_t groups = a.K / a.group_size, at = (tile * groups + g) * kTileRows;
  __m512 s1, o1;
  if constexpr (Int8) {
    const __m512i halves = _mm512_loadu_si512(a.tile_halves + 2 * at);
    s1 = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
    o1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
  } else {
    s1 = _mm512_loadu_ps(a.tile_scales + at);
    o1 = _mm512_loadu_ps(a.tile_offsets + at);
  }
  for (int j = 0; j < nt; ++j) {
    const float xsum = a.x_group_sums[tok[j] * groups + g];
    const float xscale = a.xq_scale[tok[j] * groups + g];
    const __m512 t = _mm512_fmadd_ps(dot[j], _mm512_set1_ps(ratio * xscale), _mm512_set1_ps(0.5f * ratio * xsum));
    out[j] = _mm512_fnmadd_ps(o1, _mm512_set1_ps(xsum), _mm512_fmadd_ps(s1, t, out[j]));
  }
}

// Stores rows n .. min(n + 16, n1) - 1 of the tokens' outputs (int8 mode: times the row scales),
// bias added.
template <bool Int8>
MOBIQ_AVX512VNNI inline void store_tile(const RsmmArgs& a, const int32_t* tok, int nt, int64_t n, int64_t n1,
                                        const __m512* out) {
  const int64_t rows = n1 - n < kTileRows ? n1 - n : kTileRows;
  const __mmask16 m = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + n) : _mm512_setzero_ps();
  const __m512 unit = Int8 ? _mm512_loadu_ps(a.row_scales + n) : _mm512_set1_ps(1.0f);
  for (int j = 0; j < nt; ++j) _mm512_mask_storeu_ps(a.y + tok[j] * a.N + n, m, _mm512_fmadd_ps(out[j], unit, bias));
}

// One row tile (rows n .. n+15, outputs stored below n1) for NT tokens reading KS slices; P
// activation planes (1: int8; 3: the exact mode's signed digits, plane p weighted 2^(8p)). U
// consecutive column tiles per step, each with its own accumulators: U = 2 gives a single token 8
// independent chains while the slice bytes are still read as one sequential stream per slice
// (two row tiles at a time would give the chains too, but interleaved streams halve the DRAM
// bandwidth of a model's decode).
template <int KS, int NT, int P, int U>
MOBIQ_AVX512VNNI void row_tile(const RsmmArgs& a, const int32_t* tok, int64_t n, int64_t n1) {
  using Q = Quads<KS, P == 1 && NT <= 2>;
  constexpr int A = slots<Q, NT>();
  const int64_t groups = a.K / a.group_size, tile = n / kTileRows;
  const size_t plane = slice_bytes(a.N, a.K);
  const uint8_t* tiles = tile_at(a.slices, a.K, n, 0);
  const int8_t* x[NT];
  for (int j = 0; j < NT; ++j) x[j] = a.xq + tok[j] * P * a.K;
  __m512 out[NT];
  for (auto& o : out) o = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[U][P][NT][A];
    for (auto& per_step : acc)
      for (auto& per_plane : per_step)
        for (auto& per_token : per_plane)
          for (auto& s : per_token) s = _mm512_setzero_si512();
    const uint8_t* p = tiles + g * (a.group_size / kTileCols) * kTileBytes;
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += U * kTileCols, p += U * kTileBytes) {
      __m512i q[U][4];
      for (int u = 0; u < U; ++u) {
        __m512i v[KS];
        for (int e = 0; e < KS; ++e) v[e] = load_codes(p + u * kTileBytes + e * plane);
        Q::build(v, q[u]);
      }
      for (int u = 0; u < U; ++u)
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < NT; ++j)
            for (int d = 0; d < P; ++d) {
              dot4(acc[u][d][j][i * A / 4], q[u][i], x[j] + d * a.K + c + u * kTileCols + 4 * i);
            }
    }
    __m512 dot[NT];
    for (int j = 0; j < NT; ++j) {
      __m512i sums[P];
      for (int d = 0; d < P; ++d) {
        sums[d] = slot_sum<Q, A>(acc[0][d][j]);
        for (int u = 1; u < U; ++u) sums[d] = _mm512_add_epi32(sums[d], slot_sum<Q, A>(acc[u][d][j]));
      }
      dot[j] = _mm512_cvtepi32_ps(sums[P - 1]);
      for (int d = P - 2; d >= 0; --d)
        dot[j] = _mm512_fmadd_ps(dot[j], _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(sums[d]));
    }
    group_epilogue<P == 1>(a, tok, NT, tile, g, step_ratio(KS), dot, out);
  }
  store_tile<P == 1>(a, tok, NT, n, n1, out);
}

// Rows [n0, n1) for one token tile; a single int8 token reading up to 3 slices takes two column
// tiles per step when the group size allows (with 4 slices the registers run out).
template <int KS, int NT, int P>
void rows(const RsmmArgs& a, const int32_t* tok, int64_t n0, int64_t n1) {
  const bool pairs = NT == 1 && P == 1 && KS <= 3 && a.group_size % (2 * kTileCols) == 0;
  for (int64_t n = n0; n < n1; n += kTileRows)
    pairs ? row_tile<KS, NT, P, 2>(a, tok, n, n1) : row_tile<KS, NT, P, 1>(a, tok, n, n1);
}

// Exact mode (3 planes) takes at most 2 tokens at a time: 3 or 4 would not fit the registers.
template <int NT, int P>
void tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  if constexpr (P == 3 && NT > 2) {
    tile<2, P>(a, tok, k, n0, n1);
    tile<NT - 2, P>(a, tok + 2, k, n0, n1);
    return;
  }
  switch (k) {
    case 1: rows<1, NT, P>(a, tok, n0, n1); break;
    case 2: rows<2, NT, P>(a, tok, n0, n1); break;
    case 3: rows<3, NT, P>(a, tok, n0, n1); break;
    default: rows<4, NT, P>(a, tok, n0, n1); break;
  }
}

// Decode (up to 4 tokens): one pass over the rows. Prefill: row tiles outermost, so each row
// tile's slice bytes are read from cache for every token tile.
template <int P>
void run(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  constexpr auto tiles = run_tiles<tile<1, P>, tile<2, P>, tile<3, P>, tile<4, P>>;
  if (num_tokens <= 4) return tiles(a, tokens, num_tokens, k, n0, n1);
  for (int64_t n = n0; n < n1; n += kTileRows) tiles(a, tokens, num_tokens, k, n, n + kTileRows < n1 ? n + kTileRows : n1);
}

}  // namespace

void rsmm_i8_16x4__avx512vnni(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                              int64_t n1) {
  run<1>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_f32_16x4__avx512vnni(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                               int64_t n1) {
  run<3>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
