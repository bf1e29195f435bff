// The shim's error convention, shared by its translation units: a C ABI function returns NULL on
// success or a malloc'ed message (freed by the caller with dtf_free_error).
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace dtf {

inline char *dup_error(const std::string &msg) {
  char *out = static_cast<char *>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

// Runs `f`, turning any C++ exception into the message the caller receives.
template <typename F> char *guarded(F &&f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception &e) {
    return dup_error(e.what());
  } catch (...) {
    return dup_error("unknown C++ exception");
  }
}

} // namespace dtf
