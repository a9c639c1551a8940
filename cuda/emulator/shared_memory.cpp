// Reads the ELF symbol table for a kernel's __shared__ variables: see shared_memory.h.
#include "shared_memory.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>

namespace mj_emu {
namespace detail {
namespace {

std::string demangled(const std::string& mangled) {
  int status = 0;
  const std::unique_ptr<char, decltype(&std::free)> name(
      abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status), &std::free);
  return status == 0 ? std::string(name.get()) : mangled;
}

}  // namespace

KernelSymbols find_kernel_symbols(const void* kernel) {
  KernelSymbols result;
  Dl_info info{};
  link_map* module = nullptr;
  if (!dladdr1(kernel, &info, reinterpret_cast<void**>(&module), RTLD_DL_LINKMAP) || !module) {
    result.problem = "the kernel's address is in no loaded shared library";
    return result;
  }
  std::ifstream file(info.dli_fname, std::ios::binary);
  const std::vector<char> image{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
  const auto at = [&](size_t offset, size_t size) { return offset + size <= image.size(); };
  if (!at(0, sizeof(Elf64_Ehdr)) || std::memcmp(image.data(), ELFMAG, SELFMAG) != 0 ||
      image[EI_CLASS] != ELFCLASS64) {
    result.problem = std::string("cannot read ") + info.dli_fname + " as a 64-bit ELF file";
    return result;
  }
  const auto& header = *reinterpret_cast<const Elf64_Ehdr*>(image.data());
  if (!at(header.e_shoff, size_t{header.e_shnum} * sizeof(Elf64_Shdr))) {
    result.problem = std::string(info.dli_fname) + " has no section table";
    return result;
  }
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + header.e_shoff);
  const Elf64_Shdr* symtab = nullptr;
  for (int i = 0; i < header.e_shnum; ++i) {
    if (sections[i].sh_type == SHT_SYMTAB) symtab = &sections[i];
  }
  if (!symtab || symtab->sh_link >= header.e_shnum || !at(symtab->sh_offset, symtab->sh_size) ||
      !at(sections[symtab->sh_link].sh_offset, sections[symtab->sh_link].sh_size)) {
    result.problem = std::string(info.dli_fname) + " has no symbol table (stripped?)";
    return result;
  }
  const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image.data() + symtab->sh_offset);
  const size_t n_symbols = symtab->sh_size / sizeof(Elf64_Sym);
  const Elf64_Shdr& strtab = sections[symtab->sh_link];
  const auto name_of = [&](const Elf64_Sym& s) -> std::string {
    if (s.st_name >= strtab.sh_size) return "";
    const char* start = image.data() + strtab.sh_offset + s.st_name;
    return std::string(start, strnlen(start, strtab.sh_size - s.st_name));
  };
  const uintptr_t load_base = module->l_addr, kernel_at = reinterpret_cast<uintptr_t>(kernel);

  // The kernel's mangled name, without a clone suffix such as ".constprop.0".
  std::string kernel_name;
  for (size_t i = 0; i < n_symbols && kernel_name.empty(); ++i) {
    const std::string name = name_of(symbols[i]);
    if (ELF64_ST_TYPE(symbols[i].st_info) == STT_FUNC && load_base + symbols[i].st_value == kernel_at &&
        name.rfind("_Z", 0) == 0) {
      kernel_name = name.substr(0, name.find('.'));
    }
  }
  if (kernel_name.empty()) {
    result.problem = std::string("no symbol for the kernel in ") + info.dli_fname;
    return result;
  }
  result.name = demangled(kernel_name);

  const std::string own_statics = "_ZZ" + kernel_name.substr(2) + "E";  // then the variable's name
  for (size_t i = 0; i < n_symbols; ++i) {
    const Elf64_Sym& s = symbols[i];
    const std::string name = name_of(s);
    if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || name.rfind(own_statics, 0) != 0 || s.st_size == 0 ||
        s.st_shndx == SHN_UNDEF || s.st_shndx >= header.e_shnum) {
      continue;
    }
    // __shared__ variables have no initializer: zero-initialized, writable, in .bss (never __func__ strings).
    const Elf64_Shdr& section = sections[s.st_shndx];
    if (section.sh_type != SHT_NOBITS || !(section.sh_flags & SHF_WRITE)) continue;
    result.shared.push_back({reinterpret_cast<void*>(load_base + s.st_value), s.st_size});
  }
  std::sort(result.shared.begin(), result.shared.end(),
            [](const SharedVariable& a, const SharedVariable& b) { return a.address < b.address; });
  result.shared.erase(std::unique(result.shared.begin(), result.shared.end(),
                                  [](const SharedVariable& a, const SharedVariable& b) {
                                    return a.address == b.address;
                                  }),
                      result.shared.end());
  return result;
}

}  // namespace detail
}  // namespace mj_emu
