// One switch from a run-time bit width to a kernel template instantiated per width, for
// every SIMD kernel set:
//   with_bits<8>(bits, [&]<int B>() { kernel_t<B>(...); });
// calls the lambda with B = bits for 1 <= bits < Max and with B = Max otherwise (callers
// route widths their templates do not cover elsewhere first).
#pragma once

#include <utility>

namespace turboquant::cpu {

template <int Max, class F>
inline void with_bits(int bits, F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    const bool hit = ((bits == I + 1 ? (f.template operator()<I + 1>(), true) : false) || ...);
    if (!hit) f.template operator()<Max>();
  }(std::make_integer_sequence<int, Max - 1>{});
}

}  // namespace turboquant::cpu
