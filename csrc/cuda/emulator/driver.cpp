// main() of the sanitizer driver (see driver.h): runs the named cases, or every case that is not
// a deliberate misuse.
#include "driver.h"

int main(int argc, char** argv) {
  auto& all = fastbind::driver::cases();
  int failed = 0;
  auto run = [&](const std::string& name) {
    auto it = all.find(name);
    if (it == all.end()) {
      std::fprintf(stderr, "unknown case %s\n", name.c_str());
      ++failed;
      return;
    }
    const int bad = it->second();
    std::printf("%s: %s\n", name.c_str(), bad ? "FAILED" : "ok");
    failed += bad != 0;
  };
  if (argc > 1) {
    for (int i = 1; i < argc; ++i) run(argv[i]);
  } else {
    for (const auto& [name, fn] : all)
      if (name.rfind("misuse_", 0) != 0) run(name);
  }
  return failed ? 1 : 0;
}
