// Command line of the CUDA microbenchmarks, written once: `--name VALUE` for a benchmark's
// own integer flags (each with a default and a minimum) plus `--json PATH`; anything else
// prints the usage built from the same list and exits with status 2.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace diffkern {
namespace bench {

struct IntFlag {
  const char* name;  // without the leading "--"
  long long* value;  // holds the default on entry
  long long min;
};

// Parses argv into the flags' values; returns the --json path ("" when absent).
inline std::string parse_args(int argc, char** argv, std::initializer_list<IntFlag> flags) {
  auto usage = [&]() {
    std::fprintf(stderr, "usage: %s", argv[0]);
    for (const IntFlag& f : flags) std::fprintf(stderr, " [--%s N]", f.name);
    std::fprintf(stderr, " [--json PATH]\n");
    std::exit(2);
  };
  std::string json;
  for (int i = 1; i < argc; ++i) {
    if (i + 1 >= argc || std::strncmp(argv[i], "--", 2) != 0) usage();
    const char* name = argv[i] + 2;
    const char* value = argv[++i];
    if (!std::strcmp(name, "json")) {
      json = value;
      continue;
    }
    const IntFlag* hit = nullptr;
    for (const IntFlag& f : flags)
      if (!std::strcmp(name, f.name)) hit = &f;
    if (hit == nullptr) usage();
    char* end = nullptr;
    const long long v = std::strtoll(value, &end, 10);
    if (end == value || *end != '\0' || v < hit->min) {
      std::fprintf(stderr, "--%s: expected an integer >= %lld, got '%s'\n", hit->name, hit->min, value);
      std::exit(2);
    }
    *hit->value = v;
  }
  return json;
}

}  // namespace bench
}  // namespace diffkern
