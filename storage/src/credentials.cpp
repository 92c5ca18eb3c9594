// file_credential_store: the AES-256-GCM implementation of credential_store.
//
// Secret file layout (`<dir>/<name>.secret`):
//   "FCS1" | key id (8 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)
// The associated data is "FCS1" | key id | name. The key id is the first 8 bytes of
// SHA-256("ferry-credential-key-id" | key): it tells which key a file was written with, which is
// what makes rotation recoverable (see storage/README.md). It reveals nothing about the key.
//
// Key rotation order: write `<key>.new` (atomically), re-encrypt every secret still under the old
// key (each file replaced atomically), rename `<key>.new` over `<key>`. At every instant each
// secret file is entirely under the old key or entirely under the new one, and both keys are on
// disk until the swap; `open` finishes an interrupted rotation.

#include "ferry/storage/credentials.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <mutex>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

namespace ferry::storage {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view magic = "FCS1";
constexpr std::size_t key_size = 32;
constexpr std::size_t id_size = 8;
constexpr std::size_t nonce_size = 12;
constexpr std::size_t tag_size = 16;
constexpr std::size_t header_size = magic.size() + id_size + nonce_size;
constexpr std::size_t max_secret_size = 1 << 20;
constexpr std::string_view suffix = ".secret";

std::string errno_text(int e) { return std::strerror(e); }

// A key that wipes itself.
struct aes_key {
  std::array<unsigned char, key_size> bytes{};
  std::array<unsigned char, id_size> id{};
  aes_key() = default;
  aes_key(const aes_key&) = default;
  aes_key& operator=(const aes_key&) = default;
  ~aes_key() { OPENSSL_cleanse(bytes.data(), bytes.size()); }

  void compute_id() {
    static constexpr std::string_view label = "ferry-credential-key-id";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    EVP_DigestUpdate(ctx, label.data(), label.size());
    EVP_DigestUpdate(ctx, bytes.data(), bytes.size());
    EVP_DigestFinal_ex(ctx, md, &len);
    EVP_MD_CTX_free(ctx);
    std::memcpy(id.data(), md, id_size);
  }
};

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 128 || name.front() == '.')
    return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

result<void> fsync_dir(fs::path dir) {
  if (dir.empty())
    dir = ".";
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return fail("credential store: cannot open directory " + dir.string() + ": " +
                errno_text(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (rc != 0)
    return fail("credential store: fsync of " + dir.string() + " failed: " + errno_text(e));
  return {};
}

// Writes `bytes` to `target` atomically: `.<file>.tmp` beside it (0600), fsync, rename, fsync of
// the directory. A crash leaves the old file or the new one, plus perhaps a temp file that open()
// removes.
result<void> write_atomic(const fs::path& target, const unsigned char* data, std::size_t size) {
  const fs::path tmp = target.parent_path() / ("." + target.filename().string() + ".tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0)
    return fail("credential store: cannot create " + tmp.string() + ": " + errno_text(errno));
  std::size_t done = 0;
  int e = 0;
  if (::fchmod(fd, 0600) != 0)
    e = errno;
  while (e == 0 && done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      e = errno;
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  if (e == 0 && ::fsync(fd) != 0)
    e = errno;
  ::close(fd);
  if (e == 0 && ::rename(tmp.c_str(), target.c_str()) != 0)
    e = errno;
  if (e != 0) {
    ::unlink(tmp.c_str());
    return fail("credential store: cannot write " + target.string() + ": " + errno_text(e));
  }
  return fsync_dir(target.parent_path());
}

// Reads a small regular file without following symlinks. not_found when it does not exist.
result<std::vector<unsigned char>> read_file(const fs::path& path, std::size_t limit) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return fail(e == ENOENT ? errc::not_found : errc::failed,
                "credential store: cannot open " + path.string() + ": " + errno_text(e));
  }
  std::vector<unsigned char> out;
  unsigned char buf[4096];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      const int e = errno;
      ::close(fd);
      return fail("credential store: cannot read " + path.string() + ": " + errno_text(e));
    }
    if (n == 0)
      break;
    out.insert(out.end(), buf, buf + n);
    if (out.size() > limit) {
      ::close(fd);
      return fail(errc::corrupt, "credential store: " + path.string() + " is too large");
    }
  }
  ::close(fd);
  return out;
}

// Loads a key file, refusing anything but a regular file of 32 bytes, owned by us, with no
// permissions for group or others.
result<aes_key> load_key_file(const fs::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    const int e = errno;
    return fail(e == ENOENT ? errc::not_found : errc::failed,
                "credential store: key file " + path.string() + ": " + errno_text(e));
  }
  if (!S_ISREG(st.st_mode))
    return fail("credential store: key file " + path.string() + " is not a regular file");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return fail("credential store: refusing key file " + path.string() + " with permissions " +
                mode + " (it must be 0600: readable by its owner only)");
  }
  if (st.st_uid != ::geteuid())
    return fail("credential store: refusing key file " + path.string() +
                " owned by another user (uid " + std::to_string(st.st_uid) + ")");
  if (st.st_size != static_cast<off_t>(key_size))
    return fail("credential store: refusing key file " + path.string() + " of " +
                std::to_string(st.st_size) + " bytes (a key is exactly 32 bytes)");
  auto bytes = read_file(path, key_size);
  if (!bytes)
    return bytes.error();
  if (bytes->size() != key_size)
    return fail("credential store: key file " + path.string() + " changed while read");
  aes_key k;
  std::memcpy(k.bytes.data(), bytes->data(), key_size);
  OPENSSL_cleanse(bytes->data(), bytes->size());
  k.compute_id();
  return k;
}

result<aes_key> random_key() {
  aes_key k;
  if (RAND_bytes(k.bytes.data(), static_cast<int>(k.bytes.size())) != 1)
    return fail("credential store: cannot draw a key (RAND_bytes failed)");
  k.compute_id();
  return k;
}

result<aes_key> derive_key(std::string_view secret) {
  static constexpr std::string_view salt = "ferry-credential-store-v1";
  static constexpr std::string_view info = "aes-256-gcm key";
  aes_key k;
  std::size_t len = k.bytes.size();
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
  const bool ok =
      ctx && EVP_PKEY_derive_init(ctx) == 1 && EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) == 1 &&
      EVP_PKEY_CTX_set1_hkdf_salt(ctx, reinterpret_cast<const unsigned char*>(salt.data()),
                                  static_cast<int>(salt.size())) == 1 &&
      EVP_PKEY_CTX_set1_hkdf_key(ctx, reinterpret_cast<const unsigned char*>(secret.data()),
                                 static_cast<int>(secret.size())) == 1 &&
      EVP_PKEY_CTX_add1_hkdf_info(ctx, reinterpret_cast<const unsigned char*>(info.data()),
                                  static_cast<int>(info.size())) == 1 &&
      EVP_PKEY_derive(ctx, k.bytes.data(), &len) == 1 && len == k.bytes.size();
  EVP_PKEY_CTX_free(ctx);
  if (!ok)
    return fail("credential store: cannot derive the key from the configured secret (HKDF)");
  k.compute_id();
  return k;
}

std::string aad_of(const unsigned char* id, std::string_view name) {
  std::string aad(magic);
  aad.append(reinterpret_cast<const char*>(id), id_size);
  aad.append(name);
  return aad;
}

struct cipher_ctx {
  EVP_CIPHER_CTX* p = EVP_CIPHER_CTX_new();
  ~cipher_ctx() { EVP_CIPHER_CTX_free(p); }
};

result<std::vector<unsigned char>> seal(const aes_key& key, std::string_view name,
                                        std::string_view plain) {
  std::vector<unsigned char> out(header_size + plain.size() + tag_size);
  std::memcpy(out.data(), magic.data(), magic.size());
  std::memcpy(out.data() + magic.size(), key.id.data(), id_size);
  unsigned char* nonce = out.data() + magic.size() + id_size;
  if (RAND_bytes(nonce, nonce_size) != 1)
    return fail("credential store: cannot draw a nonce (RAND_bytes failed)");
  const std::string aad = aad_of(key.id.data(), name);
  cipher_ctx c;
  int len = 0;
  bool ok = c.p && EVP_EncryptInit_ex(c.p, EVP_aes_256_gcm(), nullptr, nullptr, nullptr) == 1 &&
            EVP_CIPHER_CTX_ctrl(c.p, EVP_CTRL_GCM_SET_IVLEN, nonce_size, nullptr) == 1 &&
            EVP_EncryptInit_ex(c.p, nullptr, nullptr, key.bytes.data(), nonce) == 1 &&
            EVP_EncryptUpdate(c.p, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())) == 1;
  if (ok && !plain.empty())
    ok = EVP_EncryptUpdate(c.p, out.data() + header_size, &len,
                           reinterpret_cast<const unsigned char*>(plain.data()),
                           static_cast<int>(plain.size())) == 1;
  ok = ok && EVP_EncryptFinal_ex(c.p, out.data() + header_size + plain.size(), &len) == 1 &&
       EVP_CIPHER_CTX_ctrl(c.p, EVP_CTRL_GCM_GET_TAG, tag_size,
                           out.data() + header_size + plain.size()) == 1;
  if (!ok)
    return fail("credential store: encryption of '" + std::string(name) + "' failed");
  return out;
}

// The key id a file says it was written with (the caller checks the size first).
std::array<unsigned char, id_size> key_id_of(const std::vector<unsigned char>& file) {
  std::array<unsigned char, id_size> id{};
  std::memcpy(id.data(), file.data() + magic.size(), id_size);
  return id;
}

// Decrypts `file` into `plain` (sized by the caller: file size - overhead). A wrong key, a
// changed byte, a renamed file or a truncation all fail the tag check.
bool open_sealed(const aes_key& key, std::string_view name, const std::vector<unsigned char>& file,
                 unsigned char* plain) {
  const std::size_t n = file.size() - header_size - tag_size;
  const std::string aad = aad_of(file.data() + magic.size(), name);
  cipher_ctx c;
  int len = 0;
  unsigned char tag[tag_size];
  std::memcpy(tag, file.data() + file.size() - tag_size, tag_size);
  bool ok = c.p && EVP_DecryptInit_ex(c.p, EVP_aes_256_gcm(), nullptr, nullptr, nullptr) == 1 &&
            EVP_CIPHER_CTX_ctrl(c.p, EVP_CTRL_GCM_SET_IVLEN, nonce_size, nullptr) == 1 &&
            EVP_DecryptInit_ex(c.p, nullptr, nullptr, key.bytes.data(),
                               file.data() + magic.size() + id_size) == 1 &&
            EVP_DecryptUpdate(c.p, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())) == 1;
  if (ok && n > 0)
    ok = EVP_DecryptUpdate(c.p, plain, &len, file.data() + header_size, static_cast<int>(n)) == 1;
  ok = ok && EVP_CIPHER_CTX_ctrl(c.p, EVP_CTRL_GCM_SET_TAG, tag_size, tag) == 1 &&
       EVP_DecryptFinal_ex(c.p, plain + n, &len) == 1;
  return ok;
}

class file_credential_store final : public credential_store {
 public:
  file_credential_store(credential_store_options opts, aes_key current)
    : opts_(std::move(opts)), current_(std::move(current)) {}

  // REQUIRES: called once from open(), before the object is shared.
  result<void> recover(std::optional<aes_key> pending) {
    if (!pending)
      return {};
    // A rotation was interrupted after `<key>.new` was written: both keys are on disk; finish.
    previous_ = current_;
    current_ = *pending;
    return finish_rotation();
  }

  result<void> put(std::string_view name, std::string_view secret) override {
    if (!valid_name(name))
      return fail(errc::invalid_argument, "credential store: invalid secret name '" +
                                              std::string(name) + "' (1-128 of [A-Za-z0-9._-])");
    if (secret.size() > max_secret_size)
      return fail(errc::invalid_argument, "credential store: secret '" + std::string(name) +
                                              "' is larger than 1 MiB");
    std::lock_guard<std::mutex> lock(mu_);
    auto sealed = seal(current_, name, secret);
    if (!sealed)
      return sealed.error();
    return write_atomic(path_of(name), sealed->data(), sealed->size());
  }

  result<void> use(std::string_view name, const secret_callback& fn) override {
    if (!valid_name(name))
      return fail(errc::invalid_argument,
                  "credential store: invalid secret name '" + std::string(name) + "'");
    std::lock_guard<std::mutex> lock(mu_);
    return use_locked(name, [&](std::string_view s) {
      fn(s);
      return result<void>{};
    });
  }

  secret_use user_of(std::string name) override {
    return [this, name = std::move(name)](const secret_callback& fn) { return use(name, fn); };
  }

  result<void> remove(std::string_view name) override {
    if (!valid_name(name))
      return fail(errc::invalid_argument,
                  "credential store: invalid secret name '" + std::string(name) + "'");
    std::lock_guard<std::mutex> lock(mu_);
    if (::unlink(path_of(name).c_str()) != 0) {
      const int e = errno;
      return fail(e == ENOENT ? errc::not_found : errc::failed,
                  "credential store: cannot remove '" + std::string(name) + "': " + errno_text(e));
    }
    return fsync_dir(opts_.dir);
  }

  result<std::vector<std::string>> names() override {
    std::lock_guard<std::mutex> lock(mu_);
    return names_locked();
  }

  result<void> rotate_key() override {
    if (opts_.configured_secret)
      return fail("credential store: the key is derived from a configured secret; change the "
                  "configured secret instead of rotating");
    std::lock_guard<std::mutex> lock(mu_);
    auto fresh = random_key();
    if (!fresh)
      return fresh.error();
    if (auto w = write_atomic(pending_key_path(), fresh->bytes.data(), key_size); !w)
      return w.error();
    previous_ = current_;
    current_ = *fresh;
    return finish_rotation();
  }

 private:
  fs::path path_of(std::string_view name) const {
    return opts_.dir / (std::string(name) + std::string(suffix));
  }
  fs::path pending_key_path() const { return opts_.key_file.string() + ".new"; }

  result<std::vector<std::string>> names_locked() const {
    DIR* d = ::opendir(opts_.dir.c_str());
    if (!d)
      return fail("credential store: cannot list " + opts_.dir.string() + ": " +
                  errno_text(errno));
    std::vector<std::string> out;
    while (dirent* e = ::readdir(d)) {
      const std::string_view f = e->d_name;
      if (f.size() > suffix.size() && f.substr(f.size() - suffix.size()) == suffix) {
        const std::string_view name = f.substr(0, f.size() - suffix.size());
        if (valid_name(name))
          out.emplace_back(name);
      }
    }
    ::closedir(d);
    std::sort(out.begin(), out.end());
    return out;
  }

  // Decrypts `name` with whichever loaded key its file names and calls fn; wipes after.
  // REQUIRES: mu_ held.
  template <class Fn>
  result<void> use_locked(std::string_view name, Fn&& fn) {
    auto file = read_file(path_of(name), max_secret_size + header_size + tag_size);
    if (!file) {
      if (file.error().code == errc::not_found)
        return fail(errc::not_found, "credential store: no secret named '" + std::string(name) + "'");
      return file.error();
    }
    const std::string what = "credential store: secret '" + std::string(name) + "' ";
    if (file->size() < header_size + tag_size ||
        std::memcmp(file->data(), magic.data(), magic.size()) != 0)
      return fail(errc::corrupt, what + "is not a credential file (truncated or foreign)");
    const auto id = key_id_of(*file);
    const aes_key* key = nullptr;
    if (id == current_.id)
      key = &current_;
    else if (previous_ && id == previous_->id)
      key = &*previous_;
    if (!key)
      return fail(errc::corrupt, what + "was encrypted with a key this store does not hold");
    std::vector<unsigned char> plain(file->size() - header_size - tag_size + 1);
    struct wipe {
      std::vector<unsigned char>& b;
      ~wipe() { OPENSSL_cleanse(b.data(), b.size()); }
    } wiper{plain};
    if (!open_sealed(*key, name, *file, plain.data()))
      return fail(errc::corrupt, what + "failed authentication (tampered with, renamed, or "
                                        "encrypted with another key)");
    return fn(std::string_view(reinterpret_cast<const char*>(plain.data()), plain.size() - 1));
  }

  // Re-encrypts every secret not yet under current_ (the new key, already on disk as
  // `<key>.new`), then renames `<key>.new` over the key file. REQUIRES: mu_ held (or open()).
  result<void> finish_rotation() {
    auto all = names_locked();
    if (!all)
      return all.error();
    std::size_t rewritten = 0;
    for (const auto& name : *all) {
      auto file = read_file(path_of(name), max_secret_size + header_size + tag_size);
      if (!file)
        return file.error();
      if (file->size() >= header_size + tag_size && key_id_of(*file) == current_.id)
        continue;  // already re-encrypted before a crash
      if (rewritten == opts_.test_stop_rotation_after)
        return fail("credential store: rotation stopped by the test hook after " +
                    std::to_string(rewritten) + " secrets");
      auto r = use_locked(name, [&](std::string_view plain) -> result<void> {
        auto sealed = seal(current_, name, plain);
        if (!sealed)
          return sealed.error();
        return write_atomic(path_of(name), sealed->data(), sealed->size());
      });
      if (!r)
        return fail(r.error().code, "credential store: key rotation stopped, both keys kept: " +
                                        r.error().message);
      ++rewritten;
    }
    if (rewritten == opts_.test_stop_rotation_after)
      return fail("credential store: rotation stopped by the test hook after " +
                  std::to_string(rewritten) + " secrets, before the key swap");
    if (::rename(pending_key_path().c_str(), opts_.key_file.c_str()) != 0)
      return fail("credential store: cannot swap in the new key " + pending_key_path().string() +
                  ": " + errno_text(errno));
    if (auto s = fsync_dir(opts_.key_file.parent_path()); !s)
      return s.error();
    previous_.reset();
    return {};
  }

  const credential_store_options opts_;
  std::mutex mu_;
  aes_key current_;                 // GUARDED_BY(mu_)
  std::optional<aes_key> previous_; // GUARDED_BY(mu_): the old key during a rotation
};

}  // namespace

result<std::unique_ptr<credential_store>> credential_store::open(credential_store_options opts) {
  if (opts.dir.empty())
    return fail(errc::invalid_argument, "credential store: no directory configured");
  std::error_code ec;
  fs::create_directories(opts.dir, ec);
  if (ec)
    return fail("credential store: cannot create " + opts.dir.string() + ": " + ec.message());
  ::chmod(opts.dir.c_str(), 0700);
  if (opts.key_file.empty())
    opts.key_file = opts.dir / "master.key";

  // Temp files are what a crash in write_atomic leaves behind: never the only copy of anything.
  for (const auto& entry : fs::directory_iterator(opts.dir, ec)) {
    const std::string f = entry.path().filename().string();
    if (f.size() > 5 && f.front() == '.' && f.substr(f.size() - 4) == ".tmp")
      fs::remove(entry.path(), ec);
  }

  std::optional<aes_key> pending;
  aes_key current;
  if (opts.configured_secret) {
    if (opts.configured_secret->size() < key_size)
      return fail(errc::invalid_argument,
                  "credential store: the configured secret must be at least 32 bytes");
    auto k = derive_key(*opts.configured_secret);
    if (!k)
      return k.error();
    current = *k;
  } else {
    auto k = load_key_file(opts.key_file);
    if (!k && k.error().code == errc::not_found) {
      // First start: only when there is nothing a fresh key would make unreadable.
      bool has_secrets = false;
      for (const auto& entry : fs::directory_iterator(opts.dir, ec))
        if (entry.path().extension() == suffix)
          has_secrets = true;
      if (has_secrets)
        return fail("credential store: key file " + opts.key_file.string() +
                    " is missing but " + opts.dir.string() +
                    " holds secrets; restore the key file (a new key cannot read them)");
      auto fresh = random_key();
      if (!fresh)
        return fresh.error();
      if (auto w = write_atomic(opts.key_file, fresh->bytes.data(), key_size); !w)
        return w.error();
      k = std::move(fresh);
    }
    if (!k)
      return k.error();
    current = *k;
    const fs::path pending_path = opts.key_file.string() + ".new";
    auto p = load_key_file(pending_path);
    if (p)
      pending = *p;
    else if (p.error().code != errc::not_found)
      return p.error();
  }
  auto store = std::make_unique<file_credential_store>(std::move(opts), current);
  if (auto r = store->recover(std::move(pending)); !r)
    return fail(r.error().code, "credential store: cannot complete an interrupted key rotation: " +
                                    r.error().message);
  return std::unique_ptr<credential_store>(std::move(store));
}

}  // namespace ferry::storage
