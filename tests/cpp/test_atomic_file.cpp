#include "turboquant/atomic_file.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "turboquant/error.h"

#ifndef _WIN32
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

using namespace turboquant;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::path(::testing::TempDir()) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<uint8_t> read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

size_t count_entries(const fs::path& d) {
  return static_cast<size_t>(std::distance(fs::directory_iterator(d), fs::directory_iterator()));
}

}  // namespace

TEST(AtomicFile, ReplacesTheFileAndLeavesNoTemporary) {
  const fs::path d = fresh_dir("tq_atomic_replace");
  const std::string path = (d / "cache.tqkv").string();
  const std::vector<uint8_t> a(1000, 1), b(10, 2);
  write_file_atomic(path, a.data(), a.size());
  EXPECT_EQ(read_all(path), a);
  write_file_atomic(path, b.data(), b.size());
  EXPECT_EQ(read_all(path), b);
  write_file_atomic(path, nullptr, 0);
  EXPECT_TRUE(read_all(path).empty());
  EXPECT_EQ(count_entries(d), 1u);
  fs::remove_all(d);
}

TEST(AtomicFile, TemporaryIsAHiddenSibling) {
  EXPECT_EQ(atomic_temp_path("dir/x.bin", 12, 3), (fs::path("dir") / ".x.bin.12.3.tmp").string());
  EXPECT_EQ(atomic_temp_path("x.bin", 12, 3), ".x.bin.12.3.tmp");
}

TEST(AtomicFile, UnwritableFolderIsAClearErrorAndTheOldFileStays) {
  const fs::path d = fresh_dir("tq_atomic_missing");
  const std::string path = (d / "no_such_folder" / "cache.tqkv").string();
  const std::vector<uint8_t> a(8, 1);
  try {
    write_file_atomic(path, a.data(), a.size());
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no_such_folder"), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_file_atomic((d / "").string(), a.data(), a.size()), InvalidArgument);
  fs::remove_all(d);
}

#ifndef _WIN32
TEST(AtomicFile, StaleTemporariesOfDeadWritersAreRemoved) {
  const fs::path d = fresh_dir("tq_atomic_stale");
  const std::string path = (d / "cache.tqkv").string();
  // A writer that died: a child process that exits at once (its pid is then free).
  const pid_t child = fork();
  if (child == 0) _exit(0);
  int status = 0;
  waitpid(child, &status, 0);
  const std::string dead = atomic_temp_path(path, child, 0);
  const std::string live = atomic_temp_path(path, static_cast<long>(getppid()), 0);
  const std::string other = (d / ".other.tqkv.1.0.tmp").string();
  for (const auto& p : {dead, live, other}) std::ofstream(p) << "partial";
  const std::vector<uint8_t> a(16, 7);
  write_file_atomic(path, a.data(), a.size());
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));   // its writer may still be running
  EXPECT_TRUE(fs::exists(other));  // another file's temporary
  EXPECT_EQ(read_all(path), a);
  fs::remove_all(d);
}

// A writer killed (SIGKILL) at random moments of a save loop: the file is always absent or
// one complete version, and at most the killed writer's temporary is left.
TEST(AtomicFile, KilledWriterNeverLeavesAPartialFile) {
  const fs::path d = fresh_dir("tq_atomic_kill");
  const std::string path = (d / "cache.tqkv").string();
  constexpr size_t kSize = 4 << 20;
  for (int round = 0; round < 10; ++round) {
    const pid_t child = fork();
    if (child == 0) {
      std::vector<uint8_t> v(kSize);
      for (uint8_t version = 0;; ++version) {
        std::fill(v.begin(), v.end(), version);
        write_file_atomic(path, v.data(), v.size());
      }
    }
    usleep(static_cast<useconds_t>(2000 + 3000 * round));
    kill(child, SIGKILL);
    int status = 0;
    waitpid(child, &status, 0);
    if (fs::exists(path)) {
      const auto got = read_all(path);
      ASSERT_EQ(got.size(), kSize) << "round " << round;
      ASSERT_EQ(std::count(got.begin(), got.end(), got[0]), static_cast<long>(kSize));
    }
    EXPECT_LE(count_entries(d), 2u) << "round " << round;
  }
  fs::remove_all(d);
}
#endif
