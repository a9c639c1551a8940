// The emulator's scheduler: fibers for CUDA threads, barriers, warp shuffles, schedules, refusals, launch errors.
//
// The model, what it refuses and what it cannot check are in cuda_emulator.h. How it runs: a launch takes the
// mutex, checks its configuration, and runs the blocks one after another on the calling OS thread. For a block,
// each thread gets a fiber (its own stack and saved registers; the stacks are made once and reused). A fiber runs until
// it must wait: at __syncthreads, at a shuffle or __syncwarp, or at its end. Then it marks itself waiting, releases
// the others if it was the last one they waited for, and switches directly to the ready fiber the schedule picks.
// The last fiber to return switches back to the launcher, which starts the next block. A refusal records its
// message and switches to the launcher from wherever it is; the other fibers are simply never resumed: the next
// block or launch re-creates every fiber on its stack.
//
// One switch per thread per barrier or shuffle is most of the cost of the emulation, so a switch must be cheap.
// POSIX's swapcontext also saves and restores the signal mask, a system call: 0.4-0.7 µs per thread and barrier
// here, measured. On x86-64 the emulator switches with the dozen instructions of mj_emu_swap_stacks below instead
// (0.06 µs, the scheduler's own work included), and keeps ucontext on every other architecture (and with
// -DMJ_EMU_UCONTEXT, which a test builds, so that path stays checked).
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "shared_memory.h"

#if !defined(__x86_64__) && !defined(MJ_EMU_UCONTEXT)
#define MJ_EMU_UCONTEXT 1
#endif
#ifdef MJ_EMU_UCONTEXT
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define MJ_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MJ_EMU_ASAN 1
#endif
#endif
#ifdef MJ_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace mj_emu {
namespace detail {

const uint3* thread_idx = nullptr;
uint3 block_idx{};
dim3 block_dim, grid_dim;

}  // namespace detail

namespace {

using detail::LaunchConfig;
using detail::LaunchSite;
using detail::ShuffleMode;
using detail::Site;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute, which the emulator does not have
#ifdef MJ_EMU_ASAN
constexpr size_t kStackBytes = size_t{512} << 10;  // AddressSanitizer's redzones make every frame several times larger
#else
constexpr size_t kStackBytes = size_t{256} << 10;  // the scan's threads use a few KiB; untouched pages cost nothing
#endif

enum class Schedule { forward, reverse, random, warps, reverse_warps };
constexpr std::array<std::pair<const char*, Schedule>, 5> kSchedules{{
    {"forward", Schedule::forward}, {"reverse", Schedule::reverse}, {"random", Schedule::random},
    {"warps", Schedule::warps}, {"reverse-warps", Schedule::reverse_warps}}};

// What a thread waits at. The four shuffles first, in ShuffleMode's order.
enum class WarpOp { shfl_idx, shfl_up, shfl_down, shfl_bfly, syncwarp };
const char* name_of(WarpOp op) {
  constexpr const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                   "__syncwarp"};
  return names[static_cast<int>(op)];
}

enum class State { ready, running, barrier, warp, exited };

// ---------------------------------------------------------------------------------------------- contexts

// What a suspended fiber (or the launcher) needs to go on: its registers, saved on its own stack.
#ifdef MJ_EMU_UCONTEXT
struct Context {
  ucontext_t saved;
};

void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.saved);
  c.saved.uc_stack.ss_sp = stack;
  c.saved.uc_stack.ss_size = size;
  c.saved.uc_link = nullptr;  // fibers never return from their entry function: they switch away
  makecontext(&c.saved, entry, 0);
}

void swap_context(Context& save, Context& load) { swapcontext(&save.saved, &load.saved); }

[[noreturn]] void jump_to_context(Context& load) {
  setcontext(&load.saved);
  std::abort();  // setcontext returns only if the context is invalid
}
#else
struct Context {
  void* stack_pointer;
};

// mj_emu_swap_stacks(&save, load): pushes the registers a called function must preserve (System V x86-64 ABI: rbp, rbx,
// r12-r15, and the SSE and x87 control words), saves the stack pointer in *save, loads `load` as the stack
// pointer, pops that stack's registers, and returns into whatever called mj_emu_swap_stacks on it.
extern "C" void mj_emu_swap_stacks(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl mj_emu_swap_stacks
  .hidden mj_emu_swap_stacks
  .type mj_emu_swap_stacks, @function
mj_emu_swap_stacks:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mj_emu_swap_stacks, .-mj_emu_swap_stacks
)");

// A fresh stack laid out as mj_emu_swap_stacks leaves one: control words, six registers, and a return address that
// enters `entry`, above it a null return address for entry itself (which never returns), 16-byte aligned.
void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
  uint32_t control[2];  // this thread's MXCSR and x87 control word: the fiber starts with the same rounding
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  uint64_t* sp = top;
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  --sp;
  std::memcpy(sp, control, sizeof control);
  c.stack_pointer = sp;
}

void swap_context(Context& save, Context& load) { mj_emu_swap_stacks(&save.stack_pointer, load.stack_pointer); }

[[noreturn]] void jump_to_context(Context& load) {
  void* abandoned;
  mj_emu_swap_stacks(&abandoned, load.stack_pointer);
  std::abort();  // nothing switches back to a stack that was left for good
}
#endif

// ---------------------------------------------------------------------------------------------- fibers

struct Fiber {
  Context context;
  char* stack = nullptr;
  uint3 index{};  // threadIdx
  int rank = 0;   // x + y·blockDim.x + z·blockDim.x·blockDim.y: the warp is rank / 32, the lane rank % 32
  State state = State::ready;
  Site site{};  // where it waits
  WarpOp op = WarpOp::syncwarp;
  uint64_t value = 0, result = 0;  // a shuffle's operand and what the lane receives
  unsigned lane_arg = 0;
  int width = kWarp;
};

struct Warp {
  int lanes = 0, arrived = 0, exited = 0;
  WarpOp op = WarpOp::syncwarp;
  Site site{};
};

// One launch in progress (under the mutex): its configuration, the block being run, and how it ended.
struct Run {
  const LaunchConfig* config = nullptr;
  detail::ThreadBody body = nullptr;
  const void* call = nullptr;
  Schedule schedule = Schedule::forward;
  std::mt19937_64 random;

  int n_threads = 0, exited = 0, at_barrier = 0;
  Site barrier_site{};
  std::vector<Warp> warps;
  std::array<uint64_t, kMaxThreads / 64> ready{};  // bit i: thread rank i can run
  int cursor = 0;                                 // the rank picked last

  Context launcher;
  bool failed = false;
  std::string failure;
#ifdef MJ_EMU_ASAN
  bool entering_from_launcher = false;
  const void* launcher_stack = nullptr;
  size_t launcher_stack_size = 0;
#endif
};

std::mutex launch_mutex;  // one launch at a time in the process: the fibers share the globals of detail::
Schedule schedule = Schedule::forward;
uint64_t schedule_seed = 0;
std::vector<std::unique_ptr<Fiber>> fibers;  // the pool; a Fiber never moves (a ucontext points into itself)
std::unordered_map<const void*, detail::KernelSymbols> kernels;
Run run;
Fiber* current = nullptr;  // the running fiber, nullptr outside a launch

thread_local bool launching = false;                // this OS thread is running a launch's fibers
thread_local cudaError_t last_error = cudaSuccess;  // per host thread, as CUDA's
thread_local cudaError_t reported_error = cudaSuccess;
thread_local std::string report;  // the emulator's message for reported_error

// ---------------------------------------------------------------------------------------------- messages

std::string at(Site site) {
  return std::filesystem::path(site.file).lexically_normal().string() + ":" + std::to_string(site.line);
}

bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0); }

std::string index_text(const Fiber& f) {
  if (run.config->block.y == 1 && run.config->block.z == 1) return std::to_string(f.index.x);
  return "(" + std::to_string(f.index.x) + "," + std::to_string(f.index.y) + "," + std::to_string(f.index.z) + ")";
}

// "threads 0..63, 96", or "thread 5": the ranks in ranges, shown as threadIdx.x (or (x,y,z) in a 2-d/3-d block).
std::string threads_text(const std::vector<int>& ranks) {
  std::string text = ranks.size() == 1 ? "thread " : "threads ";
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (i > 0) text += ", ";
    text += index_text(*fibers[ranks[i]]);
    if (j > i) text += ".." + index_text(*fibers[ranks[j]]);
    i = j + 1;
  }
  return text;
}

template <typename Predicate>
std::vector<int> ranks_where(Predicate predicate, int first = 0, int end = -1) {
  std::vector<int> ranks;
  for (int i = first; i < (end < 0 ? run.n_threads : end); ++i) {
    if (predicate(*fibers[i])) ranks.push_back(i);
  }
  return ranks;
}

// Where every thread of the block is: "threads 0..15 wait at __shfl_up_sync (f.cu:12); threads 16..127 ...".
std::string block_picture() {
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (int i = 0; i < run.n_threads; ++i) {
    const Fiber& f = *fibers[i];
    std::string where;
    if (f.state == State::barrier) where = "wait at __syncthreads (" + at(f.site) + ")";
    if (f.state == State::warp) where = std::string("wait at ") + name_of(f.op) + " (" + at(f.site) + ")";
    if (f.state == State::exited) where = "have returned";
    if (f.state == State::ready || f.state == State::running) where = "can run";
    if (groups.empty() || groups.back().first != where) groups.push_back({where, {}});
    groups.back().second.push_back(i);
  }
  std::string text;
  for (const auto& [where, ranks] : groups) text += (text.empty() ? "" : "; ") + threads_text(ranks) + " " + where;
  return text;
}

// ---------------------------------------------------------------------------------------------- switching

// AddressSanitizer must be told about every switch between stacks, or it reports the new stack as an overflow.
void leaving(void** fake_stack, const void* to_stack, size_t to_size) {
#ifdef MJ_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, to_stack, to_size);
#else
  (void)fake_stack, (void)to_stack, (void)to_size;
#endif
}

void arrived(void* fake_stack) {
#ifdef MJ_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)fake_stack;
#endif
}

void make_current(Fiber* fiber) {
  current = fiber;
  detail::thread_idx = fiber ? &fiber->index : nullptr;
  if (fiber) fiber->state = State::running;
}

// From the running fiber to another; returns when some fiber switches back to this one.
void resume(Fiber& self, Fiber& next) {
  make_current(&next);
  void* fake_stack = nullptr;
  leaving(&fake_stack, next.stack, kStackBytes);
  swap_context(self.context, next.context);
  arrived(fake_stack);
}

// From a fiber that will never run again (it returned, or the launch failed) to next, or to the launcher.
[[noreturn]] void leave_for(Fiber* next) {
  make_current(next);
#ifdef MJ_EMU_ASAN
  if (next) leaving(nullptr, next->stack, kStackBytes);
  else leaving(nullptr, run.launcher_stack, run.launcher_stack_size);
#endif
  jump_to_context(next ? next->context : run.launcher);
}

// Ends the launch with a refusal. The caller's frame is abandoned with the rest of the fiber, so the temporaries
// it built the message from are never destroyed: a few hundred bytes leak per refusal.
[[noreturn]] void fail(std::string reason) {
  run.failed = true;
  run.failure = std::move(reason);
  leave_for(nullptr);
}

// ---------------------------------------------------------------------------------------------- the schedule

int next_ready(int from) {  // the first ready rank >= from, or -1
  for (int w = from / 64; from < run.n_threads && w < static_cast<int>(run.ready.size()); ++w) {
    const uint64_t bits = run.ready[w] & (w == from / 64 ? ~uint64_t{0} << (from % 64) : ~uint64_t{0});
    if (bits) return w * 64 + __builtin_ctzll(bits);
  }
  return -1;
}

int previous_ready(int from) {  // the last ready rank <= from, or -1
  for (int w = from / 64; from >= 0 && w >= 0; --w) {
    const uint64_t bits = run.ready[w] & (w == from / 64 ? ~uint64_t{0} >> (63 - from % 64) : ~uint64_t{0});
    if (bits) return w * 64 + 63 - __builtin_clzll(bits);
  }
  return -1;
}

int random_ready() {
  const int words = (run.n_threads + 63) / 64;
  int count = 0;
  for (int w = 0; w < words; ++w) count += __builtin_popcountll(run.ready[w]);
  if (count == 0) return -1;
  int k = static_cast<int>(run.random() % count);
  for (int w = 0;; ++w) {
    const int here = __builtin_popcountll(run.ready[w]);
    if (k >= here) {
      k -= here;
      continue;
    }
    uint64_t bits = run.ready[w];
    for (; k > 0; --k) bits &= bits - 1;  // drop the lowest k set bits
    return w * 64 + __builtin_ctzll(bits);
  }
}

// The ready fiber that runs next, taken out of the ready set; nullptr when none is ready.
Fiber* pick() {
  int rank = -1;
  switch (run.schedule) {
    case Schedule::forward:
      rank = next_ready(run.cursor + 1);
      if (rank < 0) rank = next_ready(0);
      break;
    case Schedule::reverse:
      rank = previous_ready(run.cursor - 1);
      if (rank < 0) rank = previous_ready(run.n_threads - 1);
      break;
    case Schedule::random:
      rank = random_ready();
      break;
    case Schedule::warps:
      rank = next_ready(0);
      break;
    case Schedule::reverse_warps:
      rank = previous_ready(run.n_threads - 1);
      break;
  }
  if (rank < 0) return nullptr;
  run.ready[rank / 64] &= ~(uint64_t{1} << (rank % 64));
  run.cursor = rank;
  return fibers[rank].get();
}

void make_ready(Fiber& f) {
  f.state = State::ready;
  run.ready[f.rank / 64] |= uint64_t{1} << (f.rank % 64);
}

// The running fiber has marked itself waiting (or was released at once): run whatever the schedule picks.
void wait(Fiber& self) {
  Fiber* next = pick();
  if (!next) fail("deadlock: no thread can go on: " + block_picture());
  if (next != &self) resume(self, *next);
}

Fiber& running(const char* what) {
  if (!current) throw std::logic_error(std::string(what) + " called outside a kernel launch");
  return *current;
}

// ---------------------------------------------------------------------------------------------- threads

void thread_exit(Fiber& self) {
  const Warp& warp = run.warps[self.rank / kWarp];
  if (run.at_barrier > 0) {
    fail(threads_text({self.rank}) + " returned from the kernel while " +
         threads_text(ranks_where([](const Fiber& f) { return f.state == State::barrier; })) +
         " wait at __syncthreads (" + at(run.barrier_site) + "): a barrier must be reached by every thread");
  }
  if (warp.arrived > 0) {
    const int first = self.rank / kWarp * kWarp;
    fail(threads_text({self.rank}) + " returned from the kernel while " +
         threads_text(ranks_where([](const Fiber& f) { return f.state == State::warp; }, first, first + warp.lanes)) +
         " of its warp wait at " + name_of(warp.op) + " (" + at(warp.site) + ")");
  }
  self.state = State::exited;
  ++run.exited;
  ++run.warps[self.rank / kWarp].exited;
  Fiber* next = pick();
  if (!next && run.exited < run.n_threads) fail("deadlock: no thread can go on: " + block_picture());
  leave_for(next);  // the last thread of the block goes back to the launcher
}

// The entry point of every fiber: this thread's run of the kernel, then its exit.
void fiber_main() {
#ifdef MJ_EMU_ASAN
  const void* from_stack = nullptr;
  size_t from_size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &from_stack, &from_size);
  if (run.entering_from_launcher) {  // the stack to name when switching back to the launcher
    run.launcher_stack = from_stack, run.launcher_stack_size = from_size;
    run.entering_from_launcher = false;
  }
#endif
  Fiber& self = *current;
  std::string thrown;  // a kernel should not throw; if one does, say so after leaving the handler
  try {
    run.body(run.call);
  } catch (const std::exception& error) {
    thrown = error.what();
  } catch (...) {
    thrown = "an exception that is not a std::exception";
  }
  if (!thrown.empty()) fail(threads_text({self.rank}) + " threw " + thrown);
  thread_exit(self);
}

Fiber& fiber_for(int rank) {
  while (static_cast<int>(fibers.size()) <= rank) {
    auto fiber = std::make_unique<Fiber>();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (memory == MAP_FAILED) throw std::bad_alloc();
    mprotect(memory, page, PROT_NONE);  // a guard page: a stack overflow is a crash, not a corruption
    fiber->stack = static_cast<char*>(memory) + page;
    fibers.push_back(std::move(fiber));
  }
  return *fibers[rank];
}

// ---------------------------------------------------------------------------------------------- one block

void start_block(uint3 block) {
  const dim3 size = run.config->block;
  detail::block_idx = block;
  run.n_threads = static_cast<int>(size.x * size.y * size.z);
  run.exited = run.at_barrier = 0;
  run.warps.assign((run.n_threads + kWarp - 1) / kWarp, Warp{});
  for (size_t w = 0; w < run.warps.size(); ++w) run.warps[w].lanes = std::min(kWarp, run.n_threads - int(w) * kWarp);
  run.ready.fill(0);
  for (int rank = 0; rank < run.n_threads; ++rank) {
    Fiber& f = fiber_for(rank);
#ifdef MJ_EMU_ASAN
    // No fiber's frames are ever unwound (each ends by switching away, or is abandoned after a refusal), so
    // AddressSanitizer's marks on the stack's last use must be cleared before it is used again.
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
    f.rank = rank;
    f.index = {rank % size.x, rank / size.x % size.y, rank / (size.x * size.y)};
    start_context(f.context, f.stack, kStackBytes, fiber_main);
    make_ready(f);
  }
  run.cursor = run.schedule == Schedule::reverse ? 0 : run.n_threads - 1;  // so the first pick is 0, or n - 1
}

// Runs the block until its last thread returns or the emulator refuses it.
void run_block(uint3 block) {
  start_block(block);
  Fiber* first = pick();
  make_current(first);
#ifdef MJ_EMU_ASAN
  run.entering_from_launcher = true;
#endif
  void* fake_stack = nullptr;
  leaving(&fake_stack, first->stack, kStackBytes);
  swap_context(run.launcher, first->context);
  arrived(fake_stack);
  make_current(nullptr);
}

// The i-th block to run in the schedule's order: forward, reversed, or (random) i -> (a·i + c) mod n with a
// coprime to n, a permutation that needs no table however large the grid.
uint3 block_at(uint64_t i, uint64_t n_blocks, uint64_t a, uint64_t c) {
  uint64_t linear = i;
  if (run.schedule == Schedule::reverse || run.schedule == Schedule::reverse_warps) linear = n_blocks - 1 - i;
  if (run.schedule == Schedule::random) {
    linear = static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i % n_blocks + c) % n_blocks);
  }
  const dim3 grid = run.config->grid;
  return {static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
          static_cast<unsigned>(linear / (uint64_t{grid.x} * grid.y))};
}

uint64_t gcd(uint64_t a, uint64_t b) { return b == 0 ? a : gcd(b, a % b); }

// ---------------------------------------------------------------------------------------------- launches

void record(cudaError_t error, std::string message) {
  last_error = reported_error = error;
  report = std::move(message);
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// Why CUDA would reject this grid and block, or "".
std::string configuration_problem(const LaunchConfig& c) {
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  if (threads == 0) return "a block of 0 threads";
  if (c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) return "blockDim.x and .y are at most 1024, .z 64";
  if (threads > kMaxThreads) return "a block of " + std::to_string(threads) + " threads; at most 1024";
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) return "an empty grid";
  if (c.grid.x > 0x7fffffffu) return "gridDim.x is at most 2^31 - 1";
  if (c.grid.y > 65535 || c.grid.z > 65535) return "gridDim.y and .z are at most 65535";
  return "";
}

const detail::KernelSymbols& symbols_of(const void* kernel) {
  auto found = kernels.find(kernel);
  if (found == kernels.end()) {
    found = kernels.emplace(kernel, detail::find_kernel_symbols(kernel)).first;
    if (!found->second.problem.empty()) {
      std::fprintf(stderr, "mj_emu: the __shared__ memory of a kernel will not be filled with NaN: %s\n",
                   found->second.problem.c_str());
    }
  }
  return found->second;
}

}  // namespace

namespace detail {

void launch(const LaunchSite& where, const LaunchConfig& config, const void* kernel, ThreadBody body,
            const void* call) {
  if (launching) {  // a kernel that launches a kernel (dynamic parallelism)
    record(cudaErrorNotSupported, std::string("operation not supported: kernel ") + where.kernel + " launched at " +
                                      at(where.site) + " from inside a kernel");
    return;
  }
  const std::lock_guard<std::mutex> lock(launch_mutex);
  const KernelSymbols& symbols = symbols_of(kernel);
  const std::string kernel_text = std::string("kernel ") + where.kernel +
                                  (symbols.name.empty() ? "" : " (" + symbols.name + ")") + " launched at " +
                                  at(where.site);
  if (const std::string problem = configuration_problem(config); !problem.empty()) {
    record(cudaErrorInvalidConfiguration, "invalid configuration argument: " + kernel_text + " with gridDim " +
                                              dims(config.grid) + ", blockDim " + dims(config.block) + ": " +
                                              problem);
    return;
  }
  size_t shared_bytes = config.shared_bytes;
  for (const SharedVariable& v : symbols.shared) shared_bytes += v.size;
  if (shared_bytes > kMaxSharedBytes) {
    record(cudaErrorInvalidValue, "invalid argument: " + kernel_text + " asks for " + std::to_string(shared_bytes) +
                                      " bytes of shared memory (static and dynamic); a block has 48 KiB");
    return;
  }

  struct Launching {  // for as long as this launch runs, however it ends
    Launching() { launching = true; }
    ~Launching() { launching = false; }
  } const in_launch;
  run.config = &config, run.body = body, run.call = call;
  run.schedule = schedule;
  run.random.seed(schedule_seed);  // every launch replays its seed's order
  run.failed = false;
  block_dim = config.block, grid_dim = config.grid;
  const uint64_t n_blocks = uint64_t{config.grid.x} * config.grid.y * config.grid.z;
  uint64_t a = 1, c = 0;
  if (schedule == Schedule::random && n_blocks > 1) {
    do a = 1 + run.random() % (n_blocks - 1);
    while (gcd(a, n_blocks) != 1);
    c = run.random() % n_blocks;
  }
  for (uint64_t i = 0; i < n_blocks && !run.failed; ++i) {
    const uint3 block = block_at(i, n_blocks, a, c);
    for (const SharedVariable& v : symbols.shared) std::memset(v.address, 0xFF, v.size);  // NaN, as float or double
    run_block(block);
    if (run.failed) {
      record(cudaErrorLaunchFailure, "unspecified launch failure: the emulator refused " + kernel_text +
                                         ", in block " + dims(block) + " under the \"" +
                                         kSchedules[static_cast<int>(schedule)].first + "\" schedule: " + run.failure);
    }
  }
}

void syncthreads(Site site) {
  Fiber& self = running("__syncthreads");
  if (run.exited > 0) {
    fail("__syncthreads (" + at(site) + ") reached by " + threads_text({self.rank}) + " after " +
         threads_text(ranks_where([](const Fiber& f) { return f.state == State::exited; })) +
         " returned from the kernel: a barrier must be reached by every thread");
  }
  if (run.at_barrier > 0 && !same_site(run.barrier_site, site)) {
    fail("threads of one block wait at different __syncthreads: " +
         threads_text(ranks_where([](const Fiber& f) { return f.state == State::barrier; })) + " at " +
         at(run.barrier_site) + ", " + threads_text({self.rank}) + " at " + at(site));
  }
  self.state = State::barrier;
  self.site = site;
  if (run.at_barrier++ == 0) run.barrier_site = site;
  if (run.at_barrier == run.n_threads) {  // the last one in releases everyone
    run.at_barrier = 0;
    for (int i = 0; i < run.n_threads; ++i) make_ready(*fibers[i]);
  }
  wait(self);
}

namespace {

// The lane whose value `lane` receives, by PTX's rule for shfl.sync (CUDA's shuffles are that instruction): the
// warp is cut into segments of `width` lanes; a source outside the lane's segment (below it for up, above it for
// down and xor) means the lane keeps its own value; only the low 5 bits of delta and laneMask count.
int source_lane(ShuffleMode mode, int lane, unsigned lane_arg, int width) {
  const int first = lane & ~(width - 1), last = first + width - 1, b = static_cast<int>(lane_arg & 31u);
  switch (mode) {
    case ShuffleMode::idx:
      return first + static_cast<int>(lane_arg & static_cast<unsigned>(width - 1));
    case ShuffleMode::up:
      return lane - b >= first ? lane - b : lane;
    case ShuffleMode::down:
      return lane + b <= last ? lane + b : lane;
    case ShuffleMode::bfly:
      return (lane ^ b) <= last ? lane ^ b : lane;
  }
  return lane;
}

uint64_t warp_sync(WarpOp op, unsigned mask, uint64_t value, unsigned lane_arg, int width, Site site) {
  Fiber& self = running(name_of(op));
  const int first = self.rank / kWarp * kWarp;
  Warp& warp = run.warps[self.rank / kWarp];
  const auto call = [&] { return std::string(name_of(op)) + " (" + at(site) + ")"; };  // only for a refusal
  if (mask != kFullMask) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", mask);
    fail(call() + " called by " + threads_text({self.rank}) + " with mask " + hex +
         ": the emulator takes only full-warp masks (0xffffffff), where CUDA's rule (every lane named calls it) "
         "cannot go wrong");
  }
  if (warp.lanes < kWarp) {
    fail(call() + " in a partial warp: " + threads_text({self.rank}) + " is in a warp of " +
         std::to_string(warp.lanes) + " lanes (the block's " + std::to_string(run.n_threads) +
         " threads are not a multiple of 32), and the full mask names lanes that do not exist");
  }
  if (op != WarpOp::syncwarp && (width < 1 || width > kWarp || (width & (width - 1)) != 0)) {
    fail(call() + " called by " + threads_text({self.rank}) + " with width " + std::to_string(width) +
         ": CUDA defines only powers of two up to 32");
  }
  if (warp.exited > 0) {
    fail(call() + " reached by " + threads_text({self.rank}) + " after " +
         threads_text(ranks_where([](const Fiber& f) { return f.state == State::exited; }, first, first + kWarp)) +
         " of its warp returned from the kernel");
  }
  if (warp.arrived > 0 && (warp.op != op || !same_site(warp.site, site))) {
    fail("lanes of one warp reach different shuffles: " +
         threads_text(ranks_where([](const Fiber& f) { return f.state == State::warp; }, first, first + kWarp)) +
         " at " + name_of(warp.op) + " (" + at(warp.site) + "), " + threads_text({self.rank}) + " at " + call());
  }
  self.state = State::warp;
  self.site = site, self.op = op, self.value = value, self.lane_arg = lane_arg, self.width = width;
  if (warp.arrived++ == 0) warp.op = op, warp.site = site;
  if (warp.arrived == kWarp) {  // the last lane in exchanges the values and releases the warp
    warp.arrived = 0;
    for (int lane = 0; lane < kWarp; ++lane) {
      Fiber& f = *fibers[first + lane];
      if (op != WarpOp::syncwarp) {
        f.result = fibers[first + source_lane(static_cast<ShuffleMode>(op), lane, f.lane_arg, f.width)]->value;
      }
      make_ready(f);
    }
  }
  wait(self);
  return self.result;
}

}  // namespace

void syncwarp(unsigned mask, Site site) { warp_sync(WarpOp::syncwarp, mask, 0, 0, kWarp, site); }

uint64_t shuffle(ShuffleMode mode, unsigned mask, uint64_t bits, unsigned lane_arg, int width, Site site) {
  return warp_sync(static_cast<WarpOp>(mode), mask, bits, lane_arg, width, site);
}

}  // namespace detail

void set_schedule(const std::string& name, uint64_t seed) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  for (const auto& [known, value] : kSchedules) {
    if (name == known) {
      schedule = value, schedule_seed = seed;
      return;
    }
  }
  std::string names;
  for (const auto& entry : kSchedules) names += (names.empty() ? "" : ", ") + std::string(entry.first);
  throw std::invalid_argument("unknown schedule '" + name + "': the emulator's schedules are " + names);
}

std::vector<std::string> schedules() {
  std::vector<std::string> names;
  for (const auto& entry : kSchedules) names.emplace_back(entry.first);
  return names;
}

}  // namespace mj_emu

// ------------------------------------------------------------------------------------------ the runtime API

cudaError_t cudaGetLastError() { return std::exchange(mj_emu::last_error, cudaSuccess); }

cudaError_t cudaPeekAtLastError() { return mj_emu::last_error; }

cudaError_t cudaDeviceSynchronize() { return mj_emu::last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  if (error != cudaSuccess && error == mj_emu::reported_error) return mj_emu::report.c_str();
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unrecognized error code";
}
