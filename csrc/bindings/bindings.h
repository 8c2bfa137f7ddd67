// One registration function per family (defined in bind_<family>.cpp), called from
// module.cpp. A new family adds one line here and one in module.cpp.
#pragma once
#include <nanobind/nanobind.h>

namespace diffkern {
namespace bindings {

void bind_log_bessel(nanobind::module_& m);
void bind_sinkhorn(nanobind::module_& m);

}  // namespace bindings
}  // namespace diffkern
