#include "bench_support.h"

#include <sys/resource.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "ferry/schemas/events.h"
#include "fsync_counter.h"

namespace ferry::bench {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

latency_summary summarize(std::vector<int64_t>& samples_ns) {
  latency_summary s;
  s.count = samples_ns.size();
  if (samples_ns.empty())
    return s;
  std::sort(samples_ns.begin(), samples_ns.end());
  // Nearest rank: the smallest sample with at least p of all samples at or below it.
  auto at = [&](double p) {
    auto rank = static_cast<size_t>(std::ceil(p * static_cast<double>(samples_ns.size())));
    return static_cast<double>(samples_ns[std::clamp<size_t>(rank, 1, samples_ns.size()) - 1]) /
           1e3;
  };
  double sum = 0;
  for (int64_t v : samples_ns)
    sum += static_cast<double>(v);
  s.mean_us = sum / static_cast<double>(samples_ns.size()) / 1e3;
  s.p50_us = at(0.50);
  s.p99_us = at(0.99);
  s.p999_us = at(0.999);
  s.max_us = static_cast<double>(samples_ns.back()) / 1e3;
  return s;
}

void sleep_unless(std::chrono::duration<double> d, const std::function<bool()>& stop) {
  auto until = bench_clock::now() + std::chrono::duration_cast<bench_clock::duration>(d);
  while (!stop()) {
    auto now = bench_clock::now();
    if (now >= until)
      return;
    std::this_thread::sleep_for(std::min<bench_clock::duration>(until - now, 5ms));
  }
}

throughput run_closed_loop_threads(int threads, const phase_timing& timing,
                                   const std::function<std::string(int)>& step) {
  struct alignas(64) worker {
    std::atomic<uint64_t> done{0};
    std::vector<int64_t> latencies_ns;
    std::string error;
  };
  std::vector<worker> workers(static_cast<size_t>(threads));
  std::atomic<bool> stop{false};
  std::atomic<bool> recording{false};
  std::atomic<bool> failed{false};
  auto total = [&] {
    uint64_t n = 0;
    for (const auto& w : workers)
      n += w.done.load(std::memory_order_relaxed);
    return n;
  };

  std::vector<std::thread> pool;
  pool.reserve(workers.size());
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&, i] {
      worker& w = workers[static_cast<size_t>(i)];
      w.latencies_ns.reserve(1 << 14);
      while (!stop.load(std::memory_order_relaxed)) {
        auto t0 = bench_clock::now();
        std::string error = step(i);
        auto t1 = bench_clock::now();
        if (!error.empty()) {
          w.error = std::move(error);
          failed = true;
          return;
        }
        w.done.fetch_add(1, std::memory_order_relaxed);
        if (recording.load(std::memory_order_relaxed))
          w.latencies_ns.push_back(std::chrono::nanoseconds(t1 - t0).count());
      }
    });

  auto has_failed = [&] { return failed.load(); };
  sleep_unless(timing.warmup, has_failed);
  auto start = phase_probe::take(total());
  recording = true;
  sleep_unless(timing.measure, has_failed);
  recording = false;
  auto end = phase_probe::take(total());
  stop = true;
  for (auto& t : pool)
    t.join();

  throughput out = end.since(start);
  std::vector<int64_t> all;
  for (auto& w : workers) {
    all.insert(all.end(), w.latencies_ns.begin(), w.latencies_ns.end());
    if (out.error.empty() && !w.error.empty())
      out.error = w.error;
  }
  out.latency = summarize(all);
  return out;
}

double process_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto secs = [](const timeval& tv) { return tv.tv_sec + tv.tv_usec / 1e6; };
  return secs(ru.ru_utime) + secs(ru.ru_stime);
}

phase_probe phase_probe::take(uint64_t events_so_far) {
  return phase_probe{bench_clock::now(), events_so_far, sync_calls(), process_cpu_seconds()};
}

throughput phase_probe::since(const phase_probe& start) const {
  throughput t;
  t.events = events - start.events;
  t.seconds = std::chrono::duration<double>(at - start.at).count();
  t.syncs = syncs - start.syncs;
  t.cpu_seconds = cpu_seconds - start.cpu_seconds;
  return t;
}

void fill_payload(char* out, size_t n, uint64_t seed) {
  // splitmix64: fast, and every byte differs from event to event.
  // 64 characters, so six bits pick one.
  static constexpr char alphabet[] =
    "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ\n";
  static_assert(sizeof alphabet == 65);
  uint64_t x = seed;
  size_t i = 0;
  while (i < n) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    for (int b = 0; b < 8 && i < n; ++b, ++i, z >>= 8)
      out[i] = alphabet[z & 63];
  }
}

namespace {

std::string build_chunk(const std::string& stream, size_t payload_size) {
  schemas::envelope_meta meta;
  meta.stream_id = stream;
  meta.event_id = std::string(32, '0');
  return schemas::output_chunk(meta, 1, schemas::ev::OutputStream::stdout,
                               std::string(payload_size, 'x'));
}

}  // namespace

event_factory::event_factory(std::string stream, size_t target_bytes)
  : stream_(std::move(stream)) {
  // The envelope's fixed part (about 250 bytes: ids, the 32-byte hash link, the stamped
  // scalars, the vtables) depends on the stream name; find the largest payload that keeps the
  // whole envelope within the target (alignment padding moves in steps of up to 4 bytes), but
  // carry at least one byte.
  size_t fixed = build_chunk(stream_, 0).size();
  size_t payload = target_bytes > fixed + 1 ? target_bytes - fixed : 1;
  template_ = build_chunk(stream_, payload);
  while (template_.size() > target_bytes && payload > 1)
    template_ = build_chunk(stream_, --payload);
  payload_size_ = payload;
  seed_ = std::hash<std::string>{}(stream_);

  auto env = schemas::verify_envelope(template_);
  if (!env)
    throw std::runtime_error("benchmark envelope does not verify: " + env.error().message);
  const char* base = template_.data();
  id_offset_ = static_cast<size_t>((*env)->event_id()->c_str() - base);
  const auto* chunk = (*env)->event_as_OutputChunk();
  payload_offset_ =
    static_cast<size_t>(reinterpret_cast<const char*>(chunk->data()->data()) - base);
}

std::string event_factory::make(uint64_t n) const {
  std::string out = template_;
  // Event id: made exactly as production makes them when a writer gives none
  // (schemas::random_event_id), so the journal's id index sees the same key order.
  const std::string id = schemas::random_event_id();
  std::memcpy(out.data() + id_offset_, id.data(), id.size());
  fill_payload(out.data() + payload_offset_, payload_size_, seed_ ^ (n * 0x9e3779b97f4a7c15ULL));
  return out;
}

temp_dir::temp_dir(const fs::path& parent, std::string_view prefix) {
  std::string tmpl = (parent / (std::string(prefix) + "XXXXXX")).string();
  if (mkdtemp(tmpl.data()))
    path_ = tmpl;
}

temp_dir::~temp_dir() {
  std::error_code ec;
  if (!path_.empty())
    fs::remove_all(path_, ec);
}

std::string filesystem_type(const fs::path& dir) {
  struct statfs st {};
  if (statfs(dir.c_str(), &st) != 0)
    return "unknown";
  switch (static_cast<unsigned long>(st.f_type)) {
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x794c7630: return "overlayfs";
    case 0x2FC12FC1: return "zfs";
    case 0x6969: return "nfs";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "0x%lx", static_cast<unsigned long>(st.f_type));
      return buf;
    }
  }
}

void progress(const std::string& line) {
  std::fprintf(stderr, "ferry-bench: %s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace ferry::bench
