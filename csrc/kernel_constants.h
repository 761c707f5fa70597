// The lengths the kernels cut their work at, stated once: the CPU and CUDA sources use them and
// csrc/module.cpp exports them to Python (xsam._C.CPU_CHUNK, ...), whose checks size their cases
// from them. Plain C++ so the .cu files can include it.
#pragma once

#include <cstdint>

namespace xsam {

// CPU work is cut into items of this many consecutive elements of the group's tensors laid end
// to end (FlatWork in ops_cpu.cpp says why).
constexpr int64_t kCpuChunk = 16384;

// Starting a parallel region costs more than a few items of work (far more when another process
// holds a core: a static schedule waits for it), so calls of fewer items run on the calling thread.
constexpr int64_t kCpuMinParallelItems = 4;

// Elements of one tensor handled by one CUDA block; every reduction partial covers exactly one
// such chunk.
constexpr int64_t kCudaChunk = 32768;

}  // namespace xsam
