#include "metrics.h"

#include "ids.h"

#include "region_admin.h"
#include "alerts.h"
#include "capacity.h"
#include "central.h"
#include "http_server.h"
#include "layout.h"
#include "ledger_writer.h"

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <tuple>

namespace tokenfuse {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

constexpr const char* kEndpointNames[] = {"check", "reserve", "commit", "charge", "release", "usage"};

double usd(std::int64_t nano) { return static_cast<double>(nano) / 1e9; }

MetricFamily family(std::string name, std::string help, MetricType type) {
  return MetricFamily{std::move(name), std::move(help), type, {}};
}

void sample(MetricFamily& f, double value, std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric m;
  m.label = std::move(labels);
  if (f.type == MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(std::move(m));
}

// Reads the region at scrape time: nothing on the hot path feeds it but the counters the engine
// keeps anyway.
class RegionCollector final : public prometheus::Collectable {
 public:
  RegionCollector(RegionAdmin& admin, const CapacityStats* capacity) : admin_(admin), capacity_(capacity) {}

  std::vector<MetricFamily> Collect() const override {
    const shm::Header& h = admin_.header();
    const shm::Stats& st = h.stats;
    constexpr auto r = std::memory_order_relaxed;
    std::vector<MetricFamily> out;

    auto& denied = out.emplace_back(family("tokenfuse_denials_total",
                                           "Calls refused by a budget layer or the kill switch, in every process "
                                           "using this host's region, since the region was created",
                                           MetricType::Counter));
    for (int i = 0; i < 4; ++i) {
      sample(denied, static_cast<double>(st.denied[i].load(r)), {{"error_code", errorCode(static_cast<Code>(i + 1))}});
    }
    // The codes only budget rules give (E-BUDGET-005 .. -007, E-RATE-*, E-CONCURRENCY-001).
    for (int i = 0; i < 6; ++i) {
      sample(denied, static_cast<double>(st.denied_by_rule[i].load(r)),
             {{"error_code", errorCode(static_cast<Code>(i + 5))}});
    }

    const BudgetView p = admin_.engine().platform();
    sample(out.emplace_back(family("tokenfuse_platform_spent_usd", "Committed spending of this budget day, USD",
                                   MetricType::Gauge)),
           usd(p.committed.count()));
    sample(out.emplace_back(family("tokenfuse_platform_reserved_usd", "Held by live reservations, USD",
                                   MetricType::Gauge)),
           usd(p.held.count()));
    auto& limit = out.emplace_back(
        family("tokenfuse_platform_limit_usd", "The platform's daily limit, USD; absent when unlimited", MetricType::Gauge));
    if (p.limit) sample(limit, usd(p.limit->count()));
    sample(out.emplace_back(family("tokenfuse_platform_calls", "Calls booked this budget day (from the ledger)",
                                   MetricType::Gauge)),
           static_cast<double>(p.calls));

    sample(out.emplace_back(family("tokenfuse_reservations_live", "Reservations holding budget now", MetricType::Gauge)),
           static_cast<double>(admin_.engine().liveReservations()));
    auto& reaped = out.emplace_back(
        family("tokenfuse_reservations_reaped_total", "Holds the agent returned, by reason", MetricType::Counter));
    sample(reaped, static_cast<double>(st.reaped_dead_owner.load(r)), {{"reason", "dead_owner"}});
    sample(reaped, static_cast<double>(st.reaped_expired.load(r)), {{"reason", "expired"}});

    const std::uint64_t tail = h.ledger_tail.load(r), head = h.ledger_head.load(r);
    sample(out.emplace_back(family("tokenfuse_ledger_lag_entries",
                                   "Ledger entries handed out but not yet durable in SQLite", MetricType::Gauge)),
           static_cast<double>(tail > head ? tail - head : 0));
    sample(out.emplace_back(family("tokenfuse_ledger_durable_seq", "Every ledger entry up to this one is on disk",
                                   MetricType::Gauge)),
           static_cast<double>(head));
    sample(out.emplace_back(family("tokenfuse_ledger_capacity_entries", "Slots in the ledger ring", MetricType::Gauge)),
           static_cast<double>(admin_.region().geometry().ledger_capacity));
    sample(out.emplace_back(family("tokenfuse_ledger_full_total",
                                   "Commits and records refused because the ledger ring was full (back-pressure)",
                                   MetricType::Counter)),
           static_cast<double>(st.ledger_full.load(r)));
    sample(out.emplace_back(family("tokenfuse_ledger_abandoned_total",
                                   "Ledger ring slots skipped because their writer died", MetricType::Counter)),
           static_cast<double>(st.ledger_abandoned.load(r)));
    sample(out.emplace_back(family("tokenfuse_holds_reconciled_total",
                                   "Layers whose holds the agent corrected to match the live reservations",
                                   MetricType::Counter)),
           static_cast<double>(st.holds_reconciled.load(r)));
    // Kept by the agent itself, not in the region: a group member cannot reset them.
    const LedgerHealth& lh = ledgerHealth();
    sample(out.emplace_back(family("tokenfuse_ledger_quarantined_total",
                                   "Ledger entries that could not be valid, set aside in ledger_quarantine since start",
                                   MetricType::Counter)),
           static_cast<double>(lh.quarantined.load(r)));
    sample(out.emplace_back(family("tokenfuse_ledger_ring_repairs_total",
                                   "Ledger ring words (tail, slot sequence words) the agent reset since start",
                                   MetricType::Counter)),
           static_cast<double>(lh.ring_repairs.load(r)));
    sample(out.emplace_back(family("tokenfuse_ledger_unavailable",
                                   "1 while the ledger file cannot be written and commits and records are refused",
                                   MetricType::Gauge)),
           static_cast<double>(lh.unavailable.load(r)));
    // Retention, as its last pass left them (Agent::pruneLedger).
    const auto gauge = [&](const char* name, const char* help, double value) {
      sample(out.emplace_back(family(name, help, MetricType::Gauge)), value);
    };
    gauge("tokenfuse_ledger_rows", "Entries in ledger.db", static_cast<double>(lh.rows.load(r)));
    gauge("tokenfuse_ledger_file_bytes", "Size of ledger.db and its WAL on disk", static_cast<double>(lh.file_bytes.load(r)));
    gauge("tokenfuse_ledger_used_bytes", "Bytes of ledger.db's pages in use (what [ledger] max_size_mb bounds)",
          static_cast<double>(lh.used_bytes.load(r)));
    gauge("tokenfuse_ledger_oldest_entry_timestamp_seconds", "When the oldest entry in ledger.db was booked (0: none)",
          static_cast<double>(lh.oldest_unix_ns.load(r)) / 1e9);
    gauge("tokenfuse_ledger_last_prune_timestamp_seconds", "When retention last ran (0: not yet)",
          static_cast<double>(lh.last_prune_unix_ns.load(r)) / 1e9);
    sample(out.emplace_back(family("tokenfuse_ledger_pruned_total", "Ledger entries retention removed since start",
                                   MetricType::Counter)),
           static_cast<double>(lh.pruned.load(r)));
    gauge("tokenfuse_ledger_over_ceiling",
          "1 while ledger.db is above [ledger] max_size_mb and what is left must stay (open windows, unpushed)",
          static_cast<double>(lh.over_ceiling.load(r)));
    gauge("tokenfuse_ledger_disk_free_bytes", "Free bytes on the data dir's file system (-1: unknown)",
          static_cast<double>(lh.disk_free_bytes.load(r)));
    gauge("tokenfuse_ledger_disk_size_bytes", "Size of the data dir's file system (-1: unknown)",
          static_cast<double>(lh.disk_size_bytes.load(r)));
    gauge("tokenfuse_ledger_disk_low", "1 while the data dir's file system has less free than [ledger] disk_warn_percent",
          static_cast<double>(lh.disk_low.load(r)));

    // Per tenant, for a dashboard: the tenants nearest their limit (or spending most, if
    // unlimited), at most kTenantSeries of them, so the label set stays small.
    constexpr std::size_t kTenantSeries = 100;
    const std::vector<std::pair<std::string, BudgetView>> rows = admin_.tenantsNearestLimit(kTenantSeries);
    // Filled side by side, then moved in: a reference into `out` would dangle at its next growth.
    MetricFamily spent = family("tokenfuse_tenant_spent_usd",
                                "Spent today by a tenant, here and elsewhere in the fleet (the 100 nearest their limit)",
                                MetricType::Gauge);
    MetricFamily limit_t =
        family("tokenfuse_tenant_limit_usd", "A tenant's daily limit (absent when unlimited)", MetricType::Gauge);
    for (const auto& [id, v] : rows) {
      const std::string label = displayId(id);   // a label must be UTF-8, whatever the region holds
      sample(spent, usd(shm::wrapAdd(v.committed.count(), v.elsewhere.count())), {{"project_id", label}});
      if (v.limit) sample(limit_t, usd(v.limit->count()), {{"project_id", label}});
    }
    out.push_back(std::move(spent));
    out.push_back(std::move(limit_t));

    collectCapacity(out);

    sample(out.emplace_back(family("tokenfuse_kill_switch_active", "1 while the emergency kill switch is on",
                                   MetricType::Gauge)),
           admin_.engine().killed() ? 1 : 0);
    sample(out.emplace_back(family("tokenfuse_budget_day", "The budget day, in days since 1970-01-01 (agent's zone)",
                                   MetricType::Gauge)),
           static_cast<double>(h.day.load(r)));
    return out;
  }

 private:
  // Table fill, and what full tables cost: keys left out at start, calls not counted or refused.
  void collectCapacity(std::vector<MetricFamily>& out) const {
    const shm::Header& h = admin_.header();
    const shm::Stats& st = h.stats;
    constexpr auto r = std::memory_order_relaxed;
    MetricFamily entries = family("tokenfuse_table_entries",
                                  "Entries in use in a region table (tenant, run and rule entries are reclaimed once "
                                  "nothing needs them; reservation slots are in use while live)",
                                  MetricType::Gauge);
    MetricFamily capacity = family("tokenfuse_table_capacity", "Slots in a region table", MetricType::Gauge);
    const std::pair<const char*, std::pair<std::uint32_t, std::uint32_t>> tables[] = {
        {"tenant", {tableEntries(admin_, LimitTable::kTenant), admin_.region().geometry().tenant_capacity}},
        {"run", {tableEntries(admin_, LimitTable::kRun), admin_.region().geometry().run_capacity}},
        {"model", {modelEntries(admin_), admin_.region().geometry().model_capacity}},
        {"reservation", {reservationEntries(admin_), admin_.region().geometry().reservation_capacity}},
        {"rule", {ruleEntries(admin_), admin_.region().geometry().rule_capacity}},
    };
    for (const auto& [name, fill] : tables) {
      sample(entries, fill.first, {{"table", name}});
      sample(capacity, fill.second, {{"table", name}});
    }
    out.push_back(std::move(entries));
    out.push_back(std::move(capacity));
    MetricFamily reclaimed = family("tokenfuse_keys_reclaimed_total",
                                    "Table entries the agent freed because nothing needed them any more, since it started",
                                    MetricType::Counter);
    sample(reclaimed, static_cast<double>(admin_.reclaimed(LimitTable::kTenant)), {{"table", "tenant"}});
    sample(reclaimed, static_cast<double>(admin_.reclaimed(LimitTable::kRun)), {{"table", "run"}});
    sample(reclaimed, static_cast<double>(admin_.reclaimedRuleCounters()), {{"table", "rule"}});
    out.push_back(std::move(reclaimed));
    if (capacity_ != nullptr) {
      MetricFamily left = family("tokenfuse_capacity_left_out",
                                 "Keys the agent's start wanted in a table (limits, ledger totals) but found no room for",
                                 MetricType::Gauge);
      sample(left, static_cast<double>(capacity_->left_out[0].load(r)), {{"table", "tenant"}});
      sample(left, static_cast<double>(capacity_->left_out[1].load(r)), {{"table", "run"}});
      out.push_back(std::move(left));
    }
    sample(out.emplace_back(family("tokenfuse_untracked_calls_total",
                                   "Calls whose tenant or run had no table room, counted in the platform only",
                                   MetricType::Counter)),
           static_cast<double>(st.untracked_calls.load(r)));
    sample(out.emplace_back(family("tokenfuse_capacity_refused_total",
                                   "Calls refused with E-TOKENFUSE-CAPACITY, and records not counted against a "
                                   "limited tenant or run, because a table had no room",
                                   MetricType::Counter)),
           static_cast<double>(st.capacity_refused.load(r)));
  }

  RegionAdmin& admin_;
  const CapacityStats* capacity_;
};

// The central link: up or down, how far behind, how much it pushed.
class LinkCollector final : public prometheus::Collectable {
 public:
  explicit LinkCollector(const LinkStats& s) : s_(s) {}

  std::vector<MetricFamily> Collect() const override {
    std::vector<MetricFamily> out;
    // Filled side by side, then moved in: a reference into `out` would dangle at its next growth.
    MetricFamily up = family("tokenfuse_central_up", "1 while the link to the central store works", MetricType::Gauge);
    MetricFamily backlog = family("tokenfuse_central_backlog_entries",
                                  "Durable ledger entries not yet in the central store", MetricType::Gauge);
    MetricFamily age = family("tokenfuse_central_last_success_unix_seconds",
                              "When a sync with the central store last succeeded", MetricType::Gauge);
    const std::uint64_t ledger = s_.ledger_seq.load();
    for (const auto& [name, configured, is_up, seq, ok] :
         {std::tuple{"redis", &s_.redis_configured, &s_.redis_up, &s_.redis_seq, &s_.redis_ok_unix_ns},
          std::tuple{"postgres", &s_.postgres_configured, &s_.postgres_up, &s_.postgres_seq, &s_.postgres_ok_unix_ns}}) {
      if (!configured->load()) continue;
      sample(up, is_up->load() ? 1 : 0, {{"link", name}});
      sample(backlog, static_cast<double>(ledger > seq->load() ? ledger - seq->load() : 0), {{"link", name}});
      sample(age, static_cast<double>(ok->load()) / 1e9, {{"link", name}});
    }
    out.push_back(std::move(up));
    out.push_back(std::move(backlog));
    out.push_back(std::move(age));
    sample(out.emplace_back(family("tokenfuse_central_pushed_entries_total", "Ledger entries pushed to Postgres",
                                   MetricType::Counter)),
           static_cast<double>(s_.pushed_entries.load()));
    sample(out.emplace_back(family("tokenfuse_central_pushed_totals_total",
                                   "Per-tenant day totals pushed to Redis", MetricType::Counter)),
           static_cast<double>(s_.pushed_totals.load()));
    sample(out.emplace_back(family("tokenfuse_central_sync_errors_total", "Failed syncs with the central store",
                                   MetricType::Counter)),
           static_cast<double>(s_.sync_errors.load()));
    return out;
  }

 private:
  const LinkStats& s_;
};

class AlertCollector final : public prometheus::Collectable {
 public:
  explicit AlertCollector(const AlertStats& s) : s_(s) {}
  std::vector<MetricFamily> Collect() const override {
    std::vector<MetricFamily> out;
    sample(out.emplace_back(family("tokenfuse_alerts_fired_total", "Alerts raised on this host (each threshold once per scope and day)",
                                   MetricType::Counter)),
           static_cast<double>(s_.fired.load()));
    auto& d = out.emplace_back(family("tokenfuse_alert_deliveries_total", "Alert messages sent to notifiers, by result",
                                      MetricType::Counter));
    sample(d, static_cast<double>(s_.delivered.load()), {{"result", "delivered"}});
    sample(d, static_cast<double>(s_.failed.load()), {{"result", "failed_attempt"}});
    sample(d, static_cast<double>(s_.dropped.load()), {{"result", "dropped"}});
    sample(d, static_cast<double>(s_.other_host.load()), {{"result", "sent_by_other_host"}});
    sample(out.emplace_back(family("tokenfuse_alert_queue_messages", "Alert messages waiting for delivery",
                                   MetricType::Gauge)),
           static_cast<double>(s_.queued.load()));
    return out;
  }

 private:
  const AlertStats& s_;
};

}  // namespace

Metrics::Metrics(RegionAdmin& admin, const LinkStats* link, const AlertStats* alerts, const CapacityStats* capacity)
    : registry_(std::make_shared<prometheus::Registry>()),
      region_(std::make_shared<RegionCollector>(admin, capacity)),
      link_(link != nullptr ? std::make_shared<LinkCollector>(*link) : nullptr),
      alerts_(alerts != nullptr ? std::make_shared<AlertCollector>(*alerts) : nullptr),
      decisions_family_(prometheus::BuildCounter()
                            .Name("tokenfuse_http_decisions_total")
                            .Help("Decisions made through the HTTP API, by endpoint, result and error code")
                            .Register(*registry_)) {}

Metrics::~Metrics() = default;

std::size_t Metrics::codeIndex(Code code) noexcept {
  const auto v = static_cast<std::int32_t>(code);
  return v <= 4 ? static_cast<std::size_t>(v) : static_cast<std::size_t>(v - 100 + 5);
}

void Metrics::decision(Endpoint endpoint, Code code) noexcept {
  const std::size_t c = codeIndex(code);
  if (c >= kCodes) return;
  const auto e = static_cast<std::size_t>(endpoint);
  std::atomic<prometheus::Counter*>& slot = decisions_[e][c];
  prometheus::Counter* counter = slot.load(std::memory_order_acquire);
  if (counter == nullptr) {
    // Family::Add is thread-safe and returns the same counter for the same labels.
    try {
      counter = &decisions_family_.Add({{"endpoint", kEndpointNames[e]},
                                        {"result", code == Code::kOk ? "allowed" : "refused"},
                                        {"error_code", code == Code::kOk ? "" : errorCode(code)}});
    } catch (const std::exception&) {
      return;   // out of memory: a metric is not worth failing a request for
    }
    slot.store(counter, std::memory_order_release);
  }
  counter->Increment();
}

namespace {

void httpFamilies(const http::ServerStats& s, std::vector<MetricFamily>* out) {
  sample(out->emplace_back(family("tokenfuse_http_connections", "HTTP connections open now", MetricType::Gauge)),
         static_cast<double>(s.open.load(std::memory_order_relaxed)));
  sample(out->emplace_back(family("tokenfuse_http_connections_accepted_total", "HTTP connections accepted",
                                  MetricType::Counter)),
         static_cast<double>(s.accepted.load(std::memory_order_relaxed)));
  MetricFamily refused = family("tokenfuse_http_refused_total",
                                "HTTP requests refused before any handler saw them, by reason and status",
                                MetricType::Counter);
  for (std::size_t i = 0; i < static_cast<std::size_t>(http::Refusal::kCount); ++i) {
    const auto r = static_cast<http::Refusal>(i);
    sample(refused, static_cast<double>(s.refused[i].load(std::memory_order_relaxed)),
           {{"reason", http::nameOf(r)}, {"status", std::to_string(http::statusOf(r))}});
  }
  out->push_back(std::move(refused));
  MetricFamily closed = family("tokenfuse_http_closed_total", "HTTP connections the agent closed, by reason",
                               MetricType::Counter);
  for (std::size_t i = 0; i < static_cast<std::size_t>(http::Closed::kCount); ++i) {
    sample(closed, static_cast<double>(s.closed[i].load(std::memory_order_relaxed)),
           {{"reason", http::nameOf(static_cast<http::Closed>(i))}});
  }
  out->push_back(std::move(closed));
}

}  // namespace

std::string Metrics::scrape() const {
  std::vector<MetricFamily> families = registry_->Collect();
  if (const http::ServerStats* s = http_.load(std::memory_order_acquire)) httpFamilies(*s, &families);
  for (MetricFamily& f : region_->Collect()) families.push_back(std::move(f));
  for (const auto& c : {link_, alerts_}) {
    if (c) {
      for (MetricFamily& f : c->Collect()) families.push_back(std::move(f));
    }
  }
  for (const auto& c : extra_) {
    for (MetricFamily& f : c->Collect()) families.push_back(std::move(f));
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace tokenfuse
