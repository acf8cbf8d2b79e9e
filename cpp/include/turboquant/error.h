// Typed exceptions thrown by every turboquant entry point. The Python bindings translate
// them: InvalidArgument -> ValueError, TypeMismatch -> TypeError, FormatError ->
// turboquant.FormatError (a ValueError), NotSupported -> NotImplementedError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace turboquant {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A value outside its allowed range, a shape that does not match, NaN/Inf input.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// Wrong element type or memory layout.
class TypeMismatch : public Error {
 public:
  using Error::Error;
};

// A truncated, corrupted, wrong-magic or unsupported-version file or buffer.
class FormatError : public Error {
 public:
  using Error::Error;
};

// A call that overlaps another thread's use of the same object in a way the object's
// thread-safety rules forbid (e.g. KVCache::append while another thread attends).
class ConcurrentAccess : public Error {
 public:
  using Error::Error;
};

// A request whose size cannot be represented or allocated (size_t overflow); the bindings
// map it, like std::bad_alloc, to MemoryError.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

// A feature that exists but not on this platform/configuration (e.g. Metal on Linux).
class NotSupported : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// TQ_CHECK(cond, InvalidArgument, "head_dim must be in [16, 512], got ", d);
#define TQ_CHECK(cond, ExcType, ...)                                          \
  do {                                                                        \
    if (!(cond)) throw ::turboquant::ExcType(::turboquant::detail::concat(__VA_ARGS__)); \
  } while (0)

}  // namespace turboquant
