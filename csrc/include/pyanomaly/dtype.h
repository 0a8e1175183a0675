// Element types as seen by kernels, shared by the torch glue and the .cu files (no torch here).
#pragma once

namespace pyanomaly {

enum class ElemType : int { kUInt8 = 0, kHalf = 1, kBFloat16 = 2, kFloat = 3, kDouble = 4 };

}  // namespace pyanomaly
