#pragma once
// ferry::gitproxy::pkt — git's pkt-line framing and the receive-pack update request, as pure
// functions over bytes (no I/O, no allocation beyond the returned vectors, no exceptions), so
// that they can be fuzzed on their own (the git proxy parses untrusted bytes from the sandbox
// with them before anything goes upstream).
//
// pkt-line (git's Documentation/technical/protocol-common.txt): four lower- or upper-case hex
// digits giving the total length including themselves, then the payload. "0000" is a flush
// packet, "0001" a delimiter (protocol v2), "0002" response-end (v2); "0003" and lengths above
// 65520 are malformed. "0004" is an empty data packet (git accepts it, so we do).
//
// Threading: pure functions; call from anywhere.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::gitproxy::pkt {

/// Largest pkt-line, length prefix included (LARGE_PACKET_MAX).
inline constexpr std::size_t max_packet_size = 65520;
/// Largest payload of a data packet.
inline constexpr std::size_t max_payload_size = max_packet_size - 4;

enum class kind { data, flush, delim, response_end };

enum class status {
  ok,         ///< one packet parsed; `consumed` bytes used
  need_more,  ///< the input is a valid prefix; read more bytes and call again
  malformed,  ///< not a pkt-line (see `error`)
};

struct packet {
  kind type = kind::flush;
  std::string_view payload;  ///< views into the input; empty unless `type == data`
};

struct parse_result {
  status st = status::need_more;
  packet pkt;
  std::size_t consumed = 0;
  const char* error = "";  ///< static text, set when `st == malformed`
};

namespace detail {
inline int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace detail

/// Parses the pkt-line at the start of `bytes`. Never reads past `bytes`.
inline parse_result parse_one(std::string_view bytes) noexcept {
  parse_result r;
  const std::size_t have = bytes.size() < 4 ? bytes.size() : 4;
  std::size_t len = 0;
  for (std::size_t i = 0; i < have; ++i) {
    const int v = detail::hex_value(bytes[i]);
    if (v < 0) {
      r.st = status::malformed;
      r.error = "pkt-line length is not four hex digits";
      return r;
    }
    len = len * 16 + static_cast<std::size_t>(v);
  }
  if (have < 4)
    return r;  // need_more
  if (len < 4) {
    if (len == 3) {
      r.st = status::malformed;
      r.error = "pkt-line length 3 is invalid";
      return r;
    }
    r.st = status::ok;
    r.pkt.type = len == 0 ? kind::flush : len == 1 ? kind::delim : kind::response_end;
    r.consumed = 4;
    return r;
  }
  if (len > max_packet_size) {
    r.st = status::malformed;
    r.error = "pkt-line longer than 65520 bytes";
    return r;
  }
  if (bytes.size() < len)
    return r;  // need_more
  r.st = status::ok;
  r.pkt.type = kind::data;
  r.pkt.payload = bytes.substr(4, len - 4);
  r.consumed = len;
  return r;
}

/// Appends `payload` as one data pkt-line to `out`. Returns false (and appends nothing) when the
/// payload is longer than max_payload_size.
inline bool append_data(std::string& out, std::string_view payload) {
  if (payload.size() > max_payload_size)
    return false;
  static constexpr char digits[] = "0123456789abcdef";
  const std::size_t len = payload.size() + 4;
  out.push_back(digits[(len >> 12) & 0xf]);
  out.push_back(digits[(len >> 8) & 0xf]);
  out.push_back(digits[(len >> 4) & 0xf]);
  out.push_back(digits[len & 0xf]);
  out.append(payload);
  return true;
}

inline void append_flush(std::string& out) { out.append("0000"); }

// -- ref names ------------------------------------------------------------------------------

/// git's ref-format rules (git-check-ref-format(1)), made stricter: ASCII only. Refuses empty
/// names, names without '/', components that start with '.' or end with ".lock", "..", "@{",
/// a bare "@", control characters, DEL, space, ~ ^ : ? * [ \, a leading or trailing '/', "//",
/// a trailing '.', and names longer than 1024 bytes.
inline bool is_valid_ref_name(std::string_view name) noexcept {
  if (name.empty() || name.size() > 1024 || name == "@")
    return false;
  if (name.front() == '/' || name.back() == '/' || name.back() == '.')
    return false;
  if (name.find('/') == std::string_view::npos)
    return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c >= 0x7f)
      return false;
    switch (c) {
      case ' ': case '~': case '^': case ':': case '?': case '*': case '[': case '\\':
        return false;
      default:
        break;
    }
    if (c == '.' && i + 1 < name.size() && name[i + 1] == '.')
      return false;
    if (c == '@' && i + 1 < name.size() && name[i + 1] == '{')
      return false;
    if (c == '/' && i + 1 < name.size() && name[i + 1] == '/')
      return false;
  }
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t end = name.find('/', start);
    if (end == std::string_view::npos)
      end = name.size();
    const std::string_view comp = name.substr(start, end - start);
    if (comp.empty() || comp.front() == '.')
      return false;
    if (comp.size() >= 5 && comp.substr(comp.size() - 5) == ".lock")
      return false;
    start = end + 1;
  }
  return true;
}

/// An object id in hex: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits.
inline bool is_oid(std::string_view s) noexcept {
  if (s.size() != 40 && s.size() != 64)
    return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
      return false;
  return true;
}

inline bool is_zero_oid(std::string_view s) noexcept {
  return s.find_first_not_of('0') == std::string_view::npos;
}

// -- the receive-pack update request --------------------------------------------------------

struct ref_command {
  std::string old_oid;
  std::string new_oid;
  std::string ref;
};

/// What `git push` sends to receive-pack before the pack (pack-protocol.txt, "update-request"):
///   *shallow-line  command-list-with-capabilities-on-the-first  flush  [push-options flush]
/// followed by the packfile (absent when every command deletes). A body that is only a flush
/// packet (git's auth probe before a large push) parses as zero commands.
struct update_request {
  std::vector<std::string> shallow;    ///< oids of "shallow <oid>" lines
  std::vector<ref_command> commands;
  std::vector<std::string> capabilities;
  std::vector<std::string> push_options;
  std::size_t consumed = 0;            ///< bytes up to (excluding) the packfile
};

struct update_parse {
  status st = status::need_more;
  update_request req;
  std::string error;  ///< set when malformed: what was wrong, for the refusal message
};

inline bool has_capability(const update_request& r, std::string_view cap) noexcept {
  for (const auto& c : r.capabilities)
    if (c == cap)
      return true;
  return false;
}

/// Parses the update request at the start of `bytes`. need_more until the command list (and the
/// push options, when the client announced the capability) is complete. Bounded: at most
/// `max_commands` commands and as many push options, each packet at most max_packet_size.
/// Refuses push certificates (`push-cert`), which the proxy does not support.
inline update_parse parse_update_request(std::string_view bytes,
                                         std::size_t max_commands = 1000) {
  update_parse out;
  std::size_t pos = 0;
  bool in_commands = false;  // past the shallow lines
  bool commands_done = false;
  bool want_options = false;
  while (true) {
    const parse_result p = parse_one(bytes.substr(pos));
    if (p.st == status::need_more)
      return out;
    if (p.st == status::malformed) {
      out.st = status::malformed;
      out.error = p.error;
      return out;
    }
    pos += p.consumed;
    if (commands_done) {  // push options until flush
      if (p.pkt.type == kind::flush) {
        out.st = status::ok;
        out.req.consumed = pos;
        return out;
      }
      if (p.pkt.type != kind::data || out.req.push_options.size() >= max_commands) {
        out.st = status::malformed;
        out.error = "bad push option list";
        return out;
      }
      std::string_view opt = p.pkt.payload;
      if (!opt.empty() && opt.back() == '\n')
        opt.remove_suffix(1);
      for (char c : opt)
        if (c == '\0' || c == '\n') {
          out.st = status::malformed;
          out.error = "bad push option";
          return out;
        }
      out.req.push_options.emplace_back(opt);
      continue;
    }
    if (p.pkt.type == kind::flush) {
      if (out.req.commands.empty() && !out.req.shallow.empty()) {
        out.st = status::malformed;
        out.error = "shallow lines without commands";
        return out;
      }
      commands_done = true;
      if (!want_options || out.req.commands.empty()) {
        out.st = status::ok;
        out.req.consumed = pos;
        return out;
      }
      continue;
    }
    if (p.pkt.type != kind::data) {
      out.st = status::malformed;
      out.error = "unexpected delimiter packet in the command list";
      return out;
    }
    std::string_view line = p.pkt.payload;
    if (!line.empty() && line.back() == '\n')
      line.remove_suffix(1);
    if (!in_commands && line.substr(0, 8) == "shallow ") {
      const std::string_view oid = line.substr(8);
      if (!is_oid(oid) || out.req.shallow.size() >= max_commands) {
        out.st = status::malformed;
        out.error = "bad shallow line";
        return out;
      }
      out.req.shallow.emplace_back(oid);
      continue;
    }
    in_commands = true;
    if (line.substr(0, 9) == "push-cert") {
      out.st = status::malformed;
      out.error = "signed pushes (push certificates) are not supported";
      return out;
    }
    if (out.req.commands.size() >= max_commands) {
      out.st = status::malformed;
      out.error = "too many ref updates in one push";
      return out;
    }
    const bool first = out.req.commands.empty();
    std::string_view caps;
    if (const auto nul = line.find('\0'); nul != std::string_view::npos) {
      if (!first) {
        out.st = status::malformed;
        out.error = "capabilities after the first command";
        return out;
      }
      caps = line.substr(nul + 1);
      line = line.substr(0, nul);
    }
    const auto sp1 = line.find(' ');
    const auto sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos) {
      out.st = status::malformed;
      out.error = "a command is not 'old-oid new-oid refname'";
      return out;
    }
    ref_command cmd{std::string(line.substr(0, sp1)),
                    std::string(line.substr(sp1 + 1, sp2 - sp1 - 1)),
                    std::string(line.substr(sp2 + 1))};
    if (!is_oid(cmd.old_oid) || !is_oid(cmd.new_oid) ||
        cmd.old_oid.size() != cmd.new_oid.size()) {
      out.st = status::malformed;
      out.error = "a command has a malformed object id";
      return out;
    }
    out.req.commands.push_back(std::move(cmd));
    if (first) {
      // Space-separated; each printable ASCII. "push-options" means a list follows the flush.
      std::size_t s = 0;
      while (s < caps.size()) {
        std::size_t e = caps.find(' ', s);
        if (e == std::string_view::npos)
          e = caps.size();
        const std::string_view cap = caps.substr(s, e - s);
        for (char c : cap)
          if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
            out.st = status::malformed;
            out.error = "bad capability list";
            return out;
          }
        if (!cap.empty())
          out.req.capabilities.emplace_back(cap);
        if (cap == "push-options")
          want_options = true;
        s = e + 1;
      }
    }
  }
}

}  // namespace ferry::gitproxy::pkt
