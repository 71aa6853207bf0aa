#include "ledger_writer.h"

#include "client_lock.h"
#include "ledger_file.h"
#include "log.h"
#include "rule_match.h"

#include <tokenfuse/money.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

namespace tokenfuse {

LedgerHealth& ledgerHealth() noexcept {
  static LedgerHealth health;
  return health;
}

namespace {

constexpr auto kAcquire = std::memory_order_acquire;

// A slot's entry, copied once out of the region: everything the writer checks and writes comes
// from this copy, so a process writing the slot meanwhile cannot make a checked value differ
// from a written one. Field names match LedgerSlot's, for ledgerChecksum().
struct SlotCopy {
  std::uint32_t kind;
  std::int64_t unix_ns, prompt_tokens, completion_tokens, cost_nano_usd;
  std::uint64_t reservation_id;
  std::int32_t day;
  shm::PackedStrings<5> text;
  shm::TagText tags;
  std::uint64_t check;
};

SlotCopy copyOf(const shm::LedgerSlot& s) {
  SlotCopy c;
  c.kind = s.kind;
  c.unix_ns = s.unix_ns;
  c.prompt_tokens = s.prompt_tokens;
  c.completion_tokens = s.completion_tokens;
  c.cost_nano_usd = s.cost_nano_usd;
  c.reservation_id = s.reservation_id;
  c.day = s.day;
  std::memcpy(static_cast<void*>(&c.text), &s.text, sizeof c.text);
  std::memcpy(static_cast<void*>(&c.tags), &s.tags, sizeof c.tags);
  c.check = s.check;
  return c;
}

// UTF-8 as RFC 3629 has it (no overlong forms, no surrogates, nothing past U+10FFFF), and no
// NUL: what SQLite's TEXT, JSON and every id elsewhere expect.
bool validId(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == 0) return false;
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t n = 0;
    std::uint32_t cp = 0;
    if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;   // truncated
    for (std::size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

constexpr std::int64_t kDayNs = 86'400'000'000'000;
// How far an entry's time may be from the agent's clock: the ring keeps entries across an agent
// that was down for a while (they carry the time they were booked), never for a year.
constexpr std::int64_t kPastDays = 400;
constexpr std::int64_t kFutureDays = 2;

// Why an entry (not void, checksum matching) cannot be valid; empty if it can.
std::string invalidBecause(const SlotCopy& c) {
  if (c.kind != shm::kLedgerCommit && c.kind != shm::kLedgerRecord) return "unknown kind " + std::to_string(c.kind);
  if (c.prompt_tokens < 0 || c.prompt_tokens > kMaxTokensPerCall || c.completion_tokens < 0 ||
      c.completion_tokens > kMaxTokensPerCall) {
    return "token count out of range";
  }
  // No price may exceed kMaxPriceNanoPerMtok (prices in the region may be corrupted too, so the
  // bound, not the price list). Fits: 2^33 tokens x 1e9 nano-USD < 2^63.
  const std::int64_t bound = (c.prompt_tokens + c.completion_tokens) * (kMaxPriceNanoPerMtok / 1'000'000) + 1;
  if (c.cost_nano_usd < 0 || c.cost_nano_usd > bound) return "cost out of range for its tokens";
  if (c.kind == shm::kLedgerCommit ? !shm::reservationIdWellFormed(c.reservation_id) : c.reservation_id != 0) {
    return "reservation id does not fit the kind";
  }
  std::size_t total = 0;
  for (const std::uint16_t len : c.text.len) {
    if (len > shm::kKeyMax) return "id longer than 128 bytes";
    total += len;
  }
  if (total > sizeof c.text.bytes) return "ids longer than the slot";
  for (std::size_t i = 0; i < 5; ++i) {
    if (!validId(c.text.get(i))) return "an id is not UTF-8 or holds a NUL";
  }
  if (c.text.len[shm::kTextProject] == 0 || c.text.len[shm::kTextModel] == 0) return "empty project_id or model";
  if (c.tags.len > shm::kTagsMax) return "tags longer than the slot";
  if (!validId(c.tags.get()) || !validTags(c.tags.get())) return "tags are not a valid tag list";
  return {};
}

// Why an entry's time or budget day cannot be right; empty if they can. The producer copied both
// from the region's header, which anyone in the group can write, so a sound entry (checksum
// matching, everything else valid) with a wrong stamp is booked at the agent's own time instead.
std::string timeProblem(const SlotCopy& c, const std::function<std::int64_t()>& clock) {
  if (!clock) return {};
  const std::int64_t now = clock();
  const std::int64_t today = now / kDayNs;   // UTC; the budget day's zone is within a day of it
  if (c.day < today - kPastDays || c.day > today + kFutureDays) return "day far from today";
  if (c.unix_ns < now - kPastDays * kDayNs || c.unix_ns > now + kFutureDays * kDayNs) return "time far from now";
  return {};
}

std::string raw(const SlotCopy& c, std::size_t i) {
  std::size_t off = 0;
  for (std::size_t j = 0; j < i; ++j) off += c.text.len[j];
  if (off >= sizeof c.text.bytes) return {};
  return std::string(c.text.bytes + off, std::min<std::size_t>(c.text.len[i], sizeof c.text.bytes - off));
}

}  // namespace

LedgerWriter::LedgerWriter(RegionAdmin& admin, Ledger& ledger, std::string host_id, Options options)
    : admin_(admin), region_(admin.region()), ledger_(ledger), ring_(region_.header(), region_.ledger(), region_.geometry().ledger_capacity),
      host_id_(std::move(host_id)), options_(std::move(options)) {
  batch_.reserve(std::min<std::size_t>(options_.max_batch, 4096));
  // Where to resume is the ledger's, not the region's (anyone in the group can write that).
  head_ = ledger_.durableHead();
  region_.header().ledger_head.store(head_, std::memory_order_release);
  // A previous agent may have died after its transaction but before handing every slot behind
  // it back, and anyone may have written the ring: until repaired, producers could not use it.
  repair();
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

void LedgerWriter::fixTail() {
  shm::Header& h = region_.header();
  const std::uint64_t tail = h.ledger_tail.load(kAcquire);
  const std::uint64_t cap = ring_.capacity();
  if (tail >= head_ && tail - head_ <= cap) return;
  // Behind what is durable (producers would reuse sequence numbers) or more than a ring ahead:
  // just past the last published entry in reach, else the head.
  std::uint64_t want = head_;
  if (tail > head_) {
    for (std::uint64_t q = head_; q < head_ + cap; ++q) {
      if (ring_.at(q).seq.load(kAcquire) == q + 1) want = q + 1;
    }
  }
  std::uint64_t expect = tail;
  if (h.ledger_tail.compare_exchange_strong(expect, want)) {
    ledgerHealth().ring_repairs.fetch_add(1, std::memory_order_relaxed);
    log::warn("ledger_ring_repaired", {{"what", "tail"}, {"found", tail}, {"set_to", want}, {"durable_head", head_}});
  }
}

std::size_t LedgerWriter::repair() {
  shm::Header& h = region_.header();
  const std::uint64_t cap = ring_.capacity();
  const std::uint64_t before = ledgerHealth().ring_repairs.load(std::memory_order_relaxed);
  fixTail();
  std::size_t changed = ledgerHealth().ring_repairs.load(std::memory_order_relaxed) - before;
  // A published entry at or past the tail: the tail was moved back, and producers would take
  // that ticket again. (A correct tail is always past every claimed slot.)
  std::uint64_t tail = h.ledger_tail.load(kAcquire);
  std::uint64_t past_published = 0;
  for (std::uint64_t q = head_; q < head_ + cap; ++q) {
    if (ring_.at(q).seq.load(kAcquire) == q + 1) past_published = q + 1;
  }
  if (past_published > tail) {
    std::uint64_t expect = tail;
    if (h.ledger_tail.compare_exchange_strong(expect, past_published)) {
      log::warn("ledger_ring_repaired", {{"what", "tail"}, {"found", tail}, {"set_to", past_published}});
      ++changed;
      tail = past_published;
    } else {
      tail = expect;
    }
  }
  const std::uint64_t from = std::max(tail, head_);
  const std::size_t before_slots = ledgerHealth().ring_repairs.load(std::memory_order_relaxed);
  healAhead(from, head_ + cap - from);
  return changed + (ledgerHealth().ring_repairs.load(std::memory_order_relaxed) - before_slots);
}

void LedgerWriter::healAhead(std::uint64_t from, std::uint64_t n) {
  // Only tickets before head_ + capacity: from there on a slot still holds one of the entries
  // this writer has read but not yet handed back.
  n = from >= head_ + ring_.capacity() ? 0 : std::min(n, head_ + ring_.capacity() - from);
  // Slots not claimed yet must be free for their ticket. A previous agent that died between its
  // transaction and handing slots back leaves the previous lap's entries (durable) in some; a
  // hostile write leaves anything. Claimed (seq == q) and published (q + 1) ones are left alone:
  // producers may be writing them right now, and only this writer stores any other value.
  const std::uint64_t cap = ring_.capacity();
  std::size_t garbage = 0;
  for (std::uint64_t q = from; q < from + n; ++q) {
    const std::uint64_t seq = ring_.at(q).seq.load(kAcquire);
    if (seq == q || seq == q + 1) continue;
    if (ring_.resetSeq(q, seq, q) && seq != q - cap + 1) ++garbage;
  }
  if (garbage > 0) {
    ledgerHealth().ring_repairs.fetch_add(garbage, std::memory_order_relaxed);
    log::warn("ledger_ring_repaired", {{"what", "slots ahead of the tail"}, {"slots", garbage}});
  }
}

void LedgerWriter::take(std::uint64_t pos, const shm::LedgerSlot& s, const char* why, DrainStats& stats) {
  const SlotCopy c = copyOf(s);
  std::string reason;
  if (ledgerChecksum(c, pos) != c.check) {
    reason = "checksum mismatch: the entry was changed after it was written";
  } else if (c.kind == shm::kLedgerVoid) {
    ++stats.skipped;
    return;
  } else {
    reason = invalidBecause(c);
  }
  if (!reason.empty()) {
    if (why != nullptr) reason = std::string(why) + "; " + reason;
    QuarantinedEntry& q = quarantine_.emplace_back();
    q.seq = pos + 1;
    q.reason = std::move(reason);
    q.kind = c.kind;
    q.unix_ns = c.unix_ns;
    q.day = c.day;
    q.prompt_tokens = c.prompt_tokens;
    q.completion_tokens = c.completion_tokens;
    q.cost_nano_usd = c.cost_nano_usd;
    q.reservation_id = c.reservation_id;
    q.check = c.check;
    q.project_id = raw(c, shm::kTextProject);
    q.run_id = raw(c, shm::kTextRun);
    q.model = raw(c, shm::kTextModel);
    q.agent_id = raw(c, shm::kTextAgent);
    q.provider = raw(c, shm::kTextProvider);
    q.tags = std::string(c.tags.get());
    ++stats.quarantined;
    return;
  }
  LedgerEntry& e = batch_.emplace_back();
  e.seq = pos + 1;
  e.unix_ns = c.unix_ns;
  e.day = c.day;
  if (day_) {
    if (std::string problem = timeProblem(c, clock_); !problem.empty()) {
      e.unix_ns = clock_();
      e.day = day_();
      ++stats.restamped;
      if (restamp_example_.empty()) restamp_example_ = "seq " + std::to_string(e.seq) + ": " + problem;
    }
  }
  e.kind = c.kind == shm::kLedgerCommit ? "commit" : "record";
  e.project_id = std::string(c.text.get(shm::kTextProject));
  e.run_id = std::string(c.text.get(shm::kTextRun));
  e.model = std::string(c.text.get(shm::kTextModel));
  e.agent_id = std::string(c.text.get(shm::kTextAgent));
  e.provider = std::string(c.text.get(shm::kTextProvider));
  e.tags = std::string(c.tags.get());
  e.prompt_tokens = c.prompt_tokens;
  e.completion_tokens = c.completion_tokens;
  e.cost_nano_usd = c.cost_nano_usd;
  e.reservation_id = c.reservation_id;
}

DrainStats LedgerWriter::drainOnce() {
  shm::Header& h = region_.header();
  DrainStats stats;
  batch_.clear();
  quarantine_.clear();
  release_.clear();
  fixTail();
  const std::uint64_t cap = ring_.capacity();
  std::uint64_t pos = head_;
  // Bounded whatever the ring holds: every step either moves pos on or changes a slot word
  // that then reads as something that does. At most one lap: past head_ + capacity the slots
  // are this batch's own, not handed back yet.
  const std::uint64_t most = std::min<std::uint64_t>(options_.max_batch, cap);
  for (std::size_t steps = 0; pos - head_ < most && steps < 2 * most + 16; ++steps) {
    shm::LedgerSlot& s = ring_.at(pos);
    const std::uint64_t seq = s.seq.load(kAcquire);
    if (seq == pos + 1) {
      take(pos, s, nullptr, stats);
      release_.push_back(pos);
      ++pos;
      continue;
    }
    const std::uint64_t tail = h.ledger_tail.load(kAcquire);
    if (seq == pos) {
      if (tail <= pos) {   // nothing more yet; the next few slots had better be claimable
        healAhead(pos + 1, std::min<std::uint64_t>(64, head_ + cap - (pos + 1)));
        break;
      }
      if (!abandoned(pos)) break;   // being written: wait for it, entries stay in order
      const std::uint32_t pid = s.writer_pid.load(std::memory_order_relaxed);
      if (!ring_.abandon(pos)) continue;   // published just now: take it
      h.stats.ledger_abandoned.fetch_add(1, std::memory_order_relaxed);
      log::warn("ledger_slot_abandoned", {{"seq", pos + 1}, {"writer_client", pid}});
      ++stats.skipped;
      ++pos;
      continue;
    }
    if (seq == pos - cap + 1) {
      // The previous lap's entry, durable (it is behind head_) but not handed back: the agent
      // before this one died in between.
      (void)ring_.resetSeq(pos, seq, pos);
      continue;
    }
    // A sequence word no correct process leaves here.
    ledgerHealth().ring_repairs.fetch_add(1, std::memory_order_relaxed);
    if (tail <= pos) {
      // Not claimed yet: make it claimable for its ticket (producers refuse it until then).
      if (ring_.resetSeq(pos, seq, pos)) log::warn("ledger_ring_repaired", {{"what", "slot"}, {"seq", pos + 1}});
      continue;
    }
    // Claimed, and its sequence word overwritten: the entry itself may be whole, which its
    // checksum tells; if not, it is quarantined. Its writer, if still writing, is told LOST.
    log::warn("ledger_ring_repaired", {{"what", "claimed slot"}, {"seq", pos + 1}});
    take(pos, s, "its sequence word was overwritten", stats);
    release_.push_back(pos);
    ++pos;
  }
  if (pos == head_) return stats;
  ledger_.append(batch_, quarantine_, pos);   // on disk when it returns; throws, leaving the ring as is
  stats.written = batch_.size();
  // A run whose entry in the region is new may have booked calls before, on an entry reclaimed
  // after it sat idle (RegionAdmin::reclaimKeys): what the ledger has of it up to the new entry's
  // birth goes on the new entry, once, so its lifelong limit counts it.
  // Its entries after the birth are all in this batch: the first batch to hold one does this.
  history_.clear();
  for (const LedgerEntry& e : batch_) {
    if (e.run_id.empty() || !e.written) continue;
    auto it = history_.find(e.run_id);
    if (it == history_.end()) {
      const std::optional<std::uint64_t> born = admin_.runWithoutHistory(e.run_id);
      if (!born) continue;
      it = history_.emplace(e.run_id, History{*born, 0, {}}).first;
    }
    // The money booked on this entry (after its birth); the statistics of every entry of the
    // batch, which addStats adds below.
    History& run = it->second;
    if (e.seq > run.born) run.cost_since += e.cost_nano_usd;
    run.batch.prompt_tokens += e.prompt_tokens, run.batch.completion_tokens += e.completion_tokens, ++run.batch.calls;
  }
  for (const auto& [run, hist] : history_) {
    LedgerTotal earlier = ledger_.runTotal(run).value_or(LedgerTotal{});
    earlier.cost_nano_usd -= hist.cost_since;
    earlier.prompt_tokens -= hist.batch.prompt_tokens, earlier.completion_tokens -= hist.batch.completion_tokens;
    earlier.calls -= hist.batch.calls;
    admin_.addHistory(run, hist.born, earlier);
    if (earlier.calls > 0) {
      log::info("run_returned", {{"run_id", run}, {"earlier_cost_usd", NanoUsd(earlier.cost_nano_usd).toString()},
                                 {"earlier_calls", earlier.calls}});
    }
  }
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
  // One line per quarantined entry, up to a few a pass (a ring full of noise must not flood the
  // log); the count is exact in the metric and the table. Raw ids stay out of the log: they may
  // not be UTF-8.
  constexpr std::size_t kLogged = 20;
  for (std::size_t i = 0; i < quarantine_.size() && i < kLogged; ++i) {
    const QuarantinedEntry& q = quarantine_[i];
    log::error("ledger_entry_quarantined", {{"seq", q.seq}, {"reason", q.reason}, {"kind", q.kind},
                                            {"cost_nano_usd", q.cost_nano_usd}, {"table", "ledger_quarantine"}});
  }
  if (quarantine_.size() > kLogged) {
    log::error("ledger_entry_quarantined", {{"more", quarantine_.size() - kLogged}, {"table", "ledger_quarantine"}});
  }
  ledgerHealth().quarantined.fetch_add(quarantine_.size(), std::memory_order_relaxed);
  if (stats.restamped > 0) {
    log::warn("ledger_entries_restamped", {{"entries", stats.restamped}, {"first", restamp_example_},
                                           {"why", "the header's clock or day word was changed from outside; "
                                                   "booked at the agent's time and budget day"}});
    restamp_example_.clear();
  }
  // Durable position first, then the slots: a crash in between leaves slots that the next
  // agent's repair() hands back, never a head behind slots already reused.
  head_ = pos;
  h.ledger_head.store(pos, std::memory_order_release);
  for (const std::uint64_t p : release_) ring_.release(p);
  return stats;
}

void LedgerWriter::setAvailable(bool available, const std::string& problem) {
  const std::string path = file_ != nullptr ? file_->path() : std::string();
  if (!available && (!unavailable_ || problem != problem_)) {
    log::error("ledger_unavailable",
               {{"path", path},
                {"problem", problem},
                {"consequence", "commits and records are refused with E-TOKENFUSE-LEDGER-UNAVAILABLE; entries already "
                                "acknowledged wait in the ring"},
                {"fix", "restore the ledger file (or free the disk), then restart tokenfused"}});
  } else if (available && unavailable_) {
    log::info("ledger_available", {{"path", path}});
  }
  // Logged first, so that an app refused for it finds the reason already in the log. Checked on
  // every pass, so that a hostile write of the word lasts one flush interval at most; stored only
  // when it differs, since every commit reads its cache line.
  std::atomic<std::uint32_t>& word = region_.header().ledger_unavailable;
  if (word.load(std::memory_order_relaxed) != (available ? 0u : 1u)) word.store(available ? 0 : 1, std::memory_order_release);
  ledgerHealth().unavailable.store(available ? 0 : 1, std::memory_order_relaxed);
  unavailable_ = !available;
  problem_ = problem;
}

bool LedgerWriter::pass(const std::stop_token& stop) {
  std::string problem;
  if (file_ != nullptr) {
    problem = file_->problem();
    if (!problem.empty() && file_->deleted()) {
      if (!unavailable_) log::error("ledger_file_missing", {{"path", file_->path()}});
      // The agent still holds the inode, and so does the second link: put the name back.
      if (file_->restore()) {
        log::warn("ledger_restored", {{"path", file_->path()}, {"from", file_->linkPath()},
                                      {"why", "ledger.db was deleted while tokenfused ran; nothing was lost"}});
        problem = file_->problem();
      }
    }
  }
  if (problem.empty()) {
    try {
      DrainStats d;
      int rounds = 0;
      do {
        d = drainOnce();
      } while (d.written + d.skipped + d.quarantined >= options_.max_batch && ++rounds < 16 &&
               !stop.stop_requested());   // keep up with bursts, and still hear a stop
    } catch (const std::exception& e) {
      // Entries stay in the ring, to be written once the ledger can be.
      problem = std::string("cannot be written: ") + e.what();
    }
  }
  setAvailable(problem.empty(), problem);
  return problem.empty();
}

void LedgerWriter::run(std::stop_token stop) {
  std::mutex mu;
  std::condition_variable_any cv;
  while (true) {
    const bool stopping = stop.stop_requested();
    pass(stop);
    if (stopping) return;
    std::unique_lock lock(mu);
    cv.wait_for(lock, stop, options_.flush_interval, [] { return false; });
  }
}

}  // namespace tokenfuse
