// init_socket_probe: a hostile command for runsc_process_api_test, run *inside* a sandbox (copied
// into its workspace; linked statically, no sanitizers) to attack ferry-init's control socket
// the way an untrusted command could when the socket is reachable (--host-uds=all, i.e. with an
// egress socket). It knows the protocol but not the sandbox's key. One line of output per event.
//
//   init_socket_probe attach SOCKET none|random   connect, print the Hello, send an Attach without
//                                                 a proof (or with a made-up one), print the answer
//   init_socket_probe impostor SOCKET SECONDS     move ferry-init's socket aside, listen in its
//                                                 place and play ferry-init (a valid Hello, an
//                                                 Attached with a made-up proof) to whoever comes

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include <flatbuffers/flatbuffers.h>

#include "ferry/schemas/frame.h"

namespace {

namespace v1 = ferry::init::v1;

void say(const std::string& line) {
  std::string l = line + "\n";
  [[maybe_unused]] ssize_t n = ::write(1, l.data(), l.size());
}

std::string random_bytes(size_t n) {
  std::string s(n, '\0');
  int fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    [[maybe_unused]] ssize_t got = ::read(fd, s.data(), n);
    ::close(fd);
  }
  return s;
}

sockaddr_un address(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), std::min(path.size(), sizeof a.sun_path - 1));
  return a;
}

void send_all(int fd, const std::string& bytes) {
  [[maybe_unused]] ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
}

/// The next message from `fd`, or nullptr at EOF / after 5 s.
const v1::InitMessage* next(int fd, ferry::wire::frame_decoder& d) {
  for (int waited = 0; waited < 5000;) {
    if (d.next() == ferry::wire::frame_decoder::status::message)
      return d.msg();
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) {
      waited += 100;
      continue;
    }
    char buf[65536];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0)
      return nullptr;
    d.feed(buf, static_cast<size_t>(n));
  }
  return nullptr;
}

std::string bytes_field(const flatbuffers::Vector<uint8_t>* v) {
  return v ? std::string(reinterpret_cast<const char*>(v->data()), v->size()) : std::string();
}

int attach(const std::string& path, const std::string& mode) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a = address(path);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    say(std::string("connect failed: ") + std::strerror(errno));
    return 1;
  }
  ferry::wire::frame_decoder d;
  const v1::InitMessage* m = next(fd, d);
  if (!m) {
    say("no Hello");
    return 1;
  }
  if (m->message_type() != v1::Message::Hello) {
    say(std::string("first message ") + v1::EnumNameMessage(m->message_type()));
    return 1;
  }
  say("hello protocol=" + std::to_string(m->message_as_Hello()->protocol()) +
      " nonce_bytes=" + std::to_string(bytes_field(m->message_as_Hello()->nonce()).size()));
  flatbuffers::FlatBufferBuilder fbb;
  flatbuffers::Offset<flatbuffers::Vector<uint8_t>> nonce, mac;
  if (mode == "random") {
    const std::string n = random_bytes(32), k = random_bytes(32);
    nonce = fbb.CreateVector(reinterpret_cast<const uint8_t*>(n.data()), n.size());
    mac = fbb.CreateVector(reinterpret_cast<const uint8_t*>(k.data()), k.size());
  }
  auto att = v1::CreateAttach(fbb, ferry::wire::socket_protocol, 0, nonce, mac);
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::Attach, att);
  // A Run right behind it: it must never be carried out.
  flatbuffers::FlatBufferBuilder fbb2;
  std::vector<std::string> argv{"/bin/sh", "-c", "echo PWNED > /workspace/pwned"};
  auto run = v1::CreateRun(fbb2, 4242, fbb2.CreateVectorOfStrings(argv));
  ferry::wire::append_message(out, fbb2, v1::Message::Run, run);
  send_all(fd, out);
  m = next(fd, d);
  if (!m) {
    say("answer: none");
  } else if (m->message_type() == v1::Message::Error) {
    const auto* msg = m->message_as_Error()->message();
    say(std::string("answer: Error: ") + (msg ? msg->c_str() : ""));
  } else {
    say(std::string("answer: ") + v1::EnumNameMessage(m->message_type()));
  }
  say(next(fd, d) ? "still open" : "closed");
  ::close(fd);
  return 0;
}

int impostor(const std::string& path, int seconds) {
  if (::rename(path.c_str(), (path + ".real").c_str()) != 0) {
    say(std::string("rename failed: ") + std::strerror(errno));
    return 1;
  }
  int lfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a = address(path);
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(lfd, 4) != 0) {
    say(std::string("bind failed: ") + std::strerror(errno));
    return 1;
  }
  say("listening");
  const time_t end = ::time(nullptr) + seconds;
  while (::time(nullptr) < end) {
    pollfd p{lfd, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0)
      continue;
    int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0)
      continue;
    say("accepted");
    flatbuffers::FlatBufferBuilder fbb;
    const std::string n = random_bytes(32);
    auto h = v1::CreateHello(fbb, ferry::wire::socket_protocol, 1, fbb.CreateVector(reinterpret_cast<const uint8_t*>(n.data()), n.size()));
    std::string out;
    ferry::wire::append_message(out, fbb, v1::Message::Hello, h);
    send_all(c, out);
    ferry::wire::frame_decoder d;
    const v1::InitMessage* m = next(c, d);
    if (m && m->message_type() == v1::Message::Attach) {
      say("got Attach with a " + std::to_string(bytes_field(m->message_as_Attach()->mac()).size()) + "-byte proof");
      flatbuffers::FlatBufferBuilder f2;
      const std::string made_up = random_bytes(32);
      auto att = v1::CreateAttached(f2, 0, 0, f2.CreateVector(reinterpret_cast<const uint8_t*>(made_up.data()), made_up.size()));
      std::string reply;
      ferry::wire::append_message(reply, f2, v1::Message::Attached, att);
      send_all(c, reply);
      // Whatever the host sends after that would be a success for us.
      m = next(c, d);
      say(m ? std::string("host then sent ") + v1::EnumNameMessage(m->message_type()) : "host sent nothing more");
    }
    ::close(c);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "attach") == 0)
    return attach(argv[2], argv[3]);
  if (argc == 4 && std::strcmp(argv[1], "impostor") == 0)
    return impostor(argv[2], std::atoi(argv[3]));
  say("usage: init_socket_probe attach SOCKET none|random | impostor SOCKET SECONDS");
  return 2;
}
