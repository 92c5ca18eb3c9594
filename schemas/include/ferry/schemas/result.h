#pragma once
// ferry::result<T>: the project's error-as-value type for component boundaries outside actors
// (inside actors, caf::expected<T> plays the same role). Header-only, no dependencies.
//
// Threading: a value type; not synchronised.

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace ferry {

/// What kind of failure an error is, for callers that react differently to each (e.g. retry a
/// conflict with a fresh version, map not_found to 404). Most errors are `failed`.
enum class errc {
  /// Anything not listed below.
  failed,
  /// An optimistic-concurrency check failed (expected version, duplicate id); nothing was written.
  conflict,
  /// The caller's input is malformed (bad stream name, empty batch, garbled bytes from a client).
  invalid_argument,
  /// Stored data failed a check (FlatBuffers verifier, hash chain): the store needs attention.
  corrupt,
  /// The object (stream, snapshot, directory) does not exist.
  not_found,
  /// The resource is held by someone else (e.g. the journal's lock by a running ferryd).
  busy,
  /// The component was closed or is shutting down.
  closed,
};

/// An error with a message that says what failed, on which object, and why.
struct error_info {
  std::string message;
  errc code = errc::failed;
};

/// Either a T or an error. Check before use: `if (!r) return r.error();`.
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  result(error_info e) : v_(std::in_place_index<1>, std::move(e)) {}

  explicit operator bool() const noexcept { return v_.index() == 0; }
  bool ok() const noexcept { return v_.index() == 0; }

  T& value() & { assert(ok()); return std::get<0>(v_); }
  const T& value() const& { assert(ok()); return std::get<0>(v_); }
  T&& value() && { assert(ok()); return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const error_info& error() const { assert(!ok()); return std::get<1>(v_); }

 private:
  std::variant<T, error_info> v_;
};

template <>
class [[nodiscard]] result<void> {
 public:
  result() = default;
  result(error_info e) : err_(std::move(e)), failed_(true) {}

  explicit operator bool() const noexcept { return !failed_; }
  bool ok() const noexcept { return !failed_; }
  const error_info& error() const { assert(failed_); return err_; }

 private:
  error_info err_;
  bool failed_ = false;
};

/// Shorthand for `return ferry::fail("...")`.
inline error_info fail(std::string message) { return error_info{std::move(message)}; }
/// Shorthand for `return ferry::fail(errc::conflict, "...")`.
inline error_info fail(errc code, std::string message) {
  return error_info{std::move(message), code};
}

}  // namespace ferry
