#include "ledger_writer.h"

#include "client_lock.h"
#include "log.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace tokenfuse {

LedgerWriter::LedgerWriter(RegionAdmin& admin, Ledger& ledger, std::string host_id, Options options)
    : admin_(admin), region_(admin.region()), ledger_(ledger), ring_(region_.header(), region_.ledger(), region_.geometry().ledger_capacity),
      host_id_(std::move(host_id)), options_(options) {
  batch_.reserve(std::min<std::size_t>(options_.max_batch, 4096));
  // A previous agent may have died after advancing ledger_head but before handing every slot
  // behind it back; until they are, the next lap could not use them.
  ring_.repairBefore(region_.header().ledger_head.load(std::memory_order_acquire));
}

bool LedgerWriter::abandoned(std::uint64_t pos) {
  const shm::LedgerSlot& s = ring_.at(pos);
  // writer_pid holds the writer's client number (client_lock.h): the kernel says whether it lives,
  // in any pid namespace, and a stopped writer is never given up on.
  const std::uint32_t client = s.writer_pid.load(std::memory_order_relaxed);
  if (client != 0) {
    return client != region_.client() &&
           clientlock::held(region_.lockFd(), client) == clientlock::Held::kNo;
  }
  // No number yet: the writer died between claiming and naming itself (two stores), or is
  // stopped right there. Writing an entry takes microseconds, so seconds of silence mean it is gone.
  const auto now = std::chrono::steady_clock::now();
  if (stuck_pos_ != pos) {
    stuck_pos_ = pos;
    stuck_since_ = now;
    return false;
  }
  return now - stuck_since_ >= options_.abandon_after;
}

DrainStats LedgerWriter::drainOnce() {
  shm::Header& h = region_.header();
  const std::uint64_t head = h.ledger_head.load(std::memory_order_relaxed);
  std::uint64_t pos = head;
  DrainStats stats;
  batch_.clear();
  abandoned_.clear();
  while (pos - head < options_.max_batch) {
    const LedgerRing::State state = ring_.state(pos);
    if (state == LedgerRing::State::kEmpty) break;
    if (state == LedgerRing::State::kWriting) {
      if (!abandoned(pos)) break;   // being written: wait for it, entries stay in order
      const std::uint32_t pid = ring_.at(pos).writer_pid.load();
      if (!ring_.abandon(pos)) continue;   // published just now: take it
      abandoned_.push_back(pos);
      h.stats.ledger_abandoned.fetch_add(1, std::memory_order_relaxed);
      log::warn("ledger_slot_abandoned", {{"seq", pos + 1}, {"writer_client", pid}});
      ++stats.skipped;
      ++pos;
      continue;
    }
    const shm::LedgerSlot& s = ring_.at(pos);
    if (s.kind == shm::kLedgerVoid) {
      ++stats.skipped;
    } else {
      LedgerEntry& e = batch_.emplace_back();
      e.seq = pos + 1;
      e.unix_ns = s.unix_ns;
      e.day = s.day;
      e.kind = s.kind == shm::kLedgerCommit ? "commit" : "record";
      // Writers check every length; a slot corrupted from outside is cut, never read past.
      auto text = [&](shm::LedgerText field) { return std::string(s.text.get(field).substr(0, shm::kKeyMax)); };
      e.project_id = text(shm::kTextProject);
      e.run_id = text(shm::kTextRun);
      e.model = text(shm::kTextModel);
      e.agent_id = text(shm::kTextAgent);
      e.provider = text(shm::kTextProvider);
      e.prompt_tokens = s.prompt_tokens;
      e.completion_tokens = s.completion_tokens;
      e.cost_nano_usd = s.cost_nano_usd;
      e.reservation_id = s.reservation_id;
    }
    ++pos;
  }
  if (pos == head) return stats;
  ledger_.append(batch_);   // on disk when it returns; throws on failure, leaving the ring as is
  stats.written = batch_.size();
  const bool log_each = spdlog::default_logger_raw()->should_log(spdlog::level::debug);
  for (const LedgerEntry& e : batch_) {
    if (!e.written) continue;
    admin_.addStats(e.project_id, e.run_id, e.day, e.prompt_tokens, e.completion_tokens);
    // The reference's per-call line, asked for by log level debug: here, not on the hot path.
    if (log_each) {
      log::event(spdlog::level::debug, "token_usage_recorded",
                 {{"seq", e.seq}, {"kind", e.kind}, {"project_id", e.project_id}, {"run_id", e.run_id},
                  {"agent_id", e.agent_id}, {"model", e.model}, {"provider", e.provider},
                  {"prompt_tokens", e.prompt_tokens}, {"completion_tokens", e.completion_tokens},
                  {"cost_usd", NanoUsd(e.cost_nano_usd).toString()}});
    }
  }
  // Durable position first, then the slots: a crash in between leaves slots that the next
  // agent's repairBefore() hands back, never a head behind slots already reused.
  h.ledger_head.store(pos, std::memory_order_release);
  for (std::uint64_t p = head; p < pos; ++p) {
    if (std::find(abandoned_.begin(), abandoned_.end(), p) == abandoned_.end()) ring_.release(p);
  }
  return stats;
}

void LedgerWriter::run(std::stop_token stop) {
  std::mutex mu;
  std::condition_variable_any cv;
  bool failing = false;
  while (true) {
    const bool stopping = stop.stop_requested();
    try {
      DrainStats d;
      do {
        d = drainOnce();
      } while (d.written + d.skipped >= options_.max_batch);   // keep up with bursts
      if (failing) log::info("ledger_write_recovered");
      failing = false;
    } catch (const std::exception& e) {
      // Entries stay in the ring (clients get E-TOKENFUSE-LEDGER-FULL once it fills); retry.
      if (!failing) log::error("ledger_write_failed", {{"error", e.what()}});
      failing = true;
    }
    if (stopping) return;
    std::unique_lock lock(mu);
    cv.wait_for(lock, stop, options_.flush_interval, [] { return false; });
  }
}

}  // namespace tokenfuse
