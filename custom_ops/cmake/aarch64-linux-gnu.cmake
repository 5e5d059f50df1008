# Cross-compiling for 64-bit ARM Linux (Raspberry Pi 4/5) with Debian's g++-aarch64-linux-gnu:
#   cmake -S custom_ops -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=custom_ops/cmake/aarch64-linux-gnu.cmake
# Binaries run here under qemu-user: qemu-aarch64 -L /usr/aarch64-linux-gnu <binary>.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
