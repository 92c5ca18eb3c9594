// libFuzzer target: the git proxy's pkt-line parser (ferry/gitproxy/pkt_line.h) on arbitrary
// bytes — one packet at a time to the end, the receive-pack update request, ref names. A crash,
// a read past the input (ASan) or undefined behaviour (UBSan) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <ferry/gitproxy/pkt_line.h>

namespace pkt = ferry::gitproxy::pkt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  // Packets, one after another, as the proxy reads a request body.
  for (std::string_view rest = in;;) {
    auto r = pkt::parse_one(rest);
    if (r.st != pkt::status::ok)
      break;
    if (r.consumed == 0 || r.consumed > rest.size())
      __builtin_trap();  // no progress, or past the input: a parser bug
    if (r.pkt.type == pkt::kind::data) {
      // The payload must be a view into the input.
      if (r.pkt.payload.data() < in.data() || r.pkt.payload.data() + r.pkt.payload.size() > in.data() + in.size())
        __builtin_trap();
      (void)pkt::is_valid_ref_name(r.pkt.payload);
    }
    rest.remove_prefix(r.consumed);
  }
  auto u = pkt::parse_update_request(in, 64);
  if (u.st == pkt::status::ok) {
    if (u.req.consumed > in.size())
      __builtin_trap();
    for (const auto& c : u.req.commands)
      (void)pkt::is_valid_ref_name(c.ref);
    (void)pkt::has_capability(u.req, "report-status");
  }
  // Round trip: what append_data frames parses back to the same payload.
  std::string framed;
  if (pkt::append_data(framed, in.substr(0, pkt::max_payload_size))) {
    auto r = pkt::parse_one(framed);
    if (r.st != pkt::status::ok || r.pkt.payload != in.substr(0, pkt::max_payload_size))
      __builtin_trap();
  }
  return 0;
}
