#include "turboquant/atomic_file.h"

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "turboquant/error.h"

#ifdef _WIN32
#include <process.h>
#else
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace turboquant {

namespace fs = std::filesystem;

namespace {

std::atomic<unsigned long> g_counter{0};

long current_pid() {
#ifdef _WIN32
  return static_cast<long>(_getpid());
#else
  return static_cast<long>(::getpid());
#endif
}

bool process_alive(long pid) {
#ifdef _WIN32
  (void)pid;
  return true;  // no cheap check: never remove another writer's temporary
#else
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
#endif
}

// Temporaries ".<name>.<pid>.<n>.tmp" of `target` whose writer process is gone.
void remove_stale_temporaries(const fs::path& target) {
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string prefix(1, '.');  // appends, not "." + s: GCC 12 warns falsely (-Wrestrict) on that
  prefix.append(target.filename().string()).push_back('.');
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= prefix.size() + 4 || name.compare(0, prefix.size(), prefix) != 0 ||
        name.compare(name.size() - 4, 4, ".tmp") != 0)
      continue;
    const std::string rest = name.substr(prefix.size(), name.size() - prefix.size() - 4);
    const size_t dot = rest.find('.');
    if (dot == 0 || dot == std::string::npos) continue;
    long pid = 0;
    bool digits = dot <= 9;
    for (size_t i = 0; digits && i < dot; ++i) {
      digits = rest[i] >= '0' && rest[i] <= '9';
      pid = pid * 10 + (rest[i] - '0');
    }
    if (!digits || pid == current_pid() || process_alive(pid)) continue;
    std::error_code ignored;
    fs::remove(it->path(), ignored);
  }
}

}  // namespace

std::string atomic_temp_path(const std::string& path, long pid, unsigned long n) {
  const fs::path p(path);
  std::string name(1, '.');
  name.append(p.filename().string()).append(".").append(std::to_string(pid));
  name.append(".").append(std::to_string(n)).append(".tmp");
  return p.has_parent_path() ? (p.parent_path() / name).string() : name;
}

void write_file_atomic(const std::string& path, const uint8_t* data, size_t size) {
  TQ_CHECK(!path.empty() && fs::path(path).has_filename(), InvalidArgument,
           "cannot write to '", path, "': not a file path");
  remove_stale_temporaries(fs::path(path));
  const std::string tmp = atomic_temp_path(path, current_pid(), g_counter.fetch_add(1));
#ifdef _WIN32
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    TQ_CHECK(f.good(), InvalidArgument, "cannot open '", tmp, "' for writing");
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    f.flush();
    if (f.fail()) {
      f.close();
      std::error_code ignored;
      fs::remove(tmp, ignored);
      throw InvalidArgument(detail::concat("writing '", tmp, "' failed"));
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw InvalidArgument(detail::concat("renaming '", tmp, "' to '", path, "' failed: ", ec.message()));
  }
#else
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TQ_CHECK(fd >= 0, InvalidArgument, "cannot open '", tmp, "' for writing: ", std::strerror(errno));
  const char* step = nullptr;
  int err = 0;
  for (size_t done = 0; done < size && step == nullptr;) {
    const ssize_t w = ::write(fd, data + done, size - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      step = "writing";
      err = errno;
    } else {
      done += static_cast<size_t>(w);
    }
  }
  if (step == nullptr && ::fsync(fd) != 0) {
    step = "flushing";
    err = errno;
  }
  if (::close(fd) != 0 && step == nullptr) {
    step = "closing";
    err = errno;
  }
  if (step == nullptr && ::rename(tmp.c_str(), path.c_str()) != 0) {
    step = "renaming";
    err = errno;
  }
  if (step != nullptr) {
    ::unlink(tmp.c_str());
    throw InvalidArgument(detail::concat(step, " '", tmp, "' (for '", path, "') failed: ",
             std::strerror(err)));
  }
  // The rename is durable once the folder's entry is on the disk; a folder that cannot be
  // opened or synced (some network file systems) leaves a complete file all the same.
  const fs::path parent = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : ".";
  const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
#endif
}

}  // namespace turboquant
