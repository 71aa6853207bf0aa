#include "http_api.h"
#include "ui_assets.h"

#include "day_clock.h"
#include "ids.h"
#include "layout.h"

#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <chrono>
#include <fstream>
#include <random>
#include <sstream>

namespace tokenfuse {

namespace {

using nlohmann::json;

// A client error: the field it concerns and the rule it broke.
struct BadRequest {
  int status;
  std::string field;
  std::string message;
};

using http::Request;
using http::Response;

json parseBody(const Request& req) {
  if (req.body.empty()) return json::object();
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded()) throw BadRequest{400, "body", "is not valid JSON"};
  if (!j.is_object()) throw BadRequest{400, "body", "must be a JSON object"};
  return j;
}

std::string text(const json& j, const char* name, bool required, std::size_t max = 128) {
  const auto it = j.find(name);
  if (it == j.end() || it->is_null()) {
    if (required) throw BadRequest{400, name, "is required"};
    return {};
  }
  if (!it->is_string()) throw BadRequest{400, name, "must be a string"};
  const std::string& s = it->get_ref<const std::string&>();
  if (required && s.empty()) throw BadRequest{400, name, "must not be empty"};
  if (s.size() > max) throw BadRequest{400, name, "may be at most " + std::to_string(max) + " bytes"};
  // JSON text is UTF-8 already, but "\u0000" puts a NUL into it.
  if (!validIdText(s)) throw BadRequest{400, name, "must be valid UTF-8 without NUL bytes"};
  return s;
}

std::int64_t count(const json& j, const char* name, bool required, std::int64_t fallback, std::int64_t max) {
  const auto it = j.find(name);
  if (it == j.end() || it->is_null()) {
    if (required) throw BadRequest{400, name, "is required"};
    return fallback;
  }
  if (!it->is_number_integer()) throw BadRequest{400, name, "must be a whole number"};
  const std::int64_t v = it->get<std::int64_t>();
  if (v < 0 || v > max) throw BadRequest{400, name, "must be from 0 to " + std::to_string(max)};
  return v;
}

// "5.00" -> limit; null -> unlimited. The key must be present.
std::optional<NanoUsd> limitField(const json& j, const char* name) {
  const auto it = j.find(name);
  if (it == j.end()) throw BadRequest{400, name, "is required (a USD amount such as \"5.00\", or null for unlimited)"};
  if (it->is_null()) return std::nullopt;
  if (!it->is_string()) throw BadRequest{400, name, "must be a decimal string such as \"5.00\", or null"};
  std::string why;
  auto v = NanoUsd::parse(it->get_ref<const std::string&>(), &why);
  if (!v) throw BadRequest{400, name, why};
  return v;
}

void reply(Response& res, int status, const json& body) {
  res.status = status;
  // Bytes that are not UTF-8 (an old ledger's, a region written by someone else) become U+FFFD
  // rather than an exception: an answer about them is still an answer.
  res.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
  res.content_type = "application/json";
}

// A refusal: 402 for a budget, 429 for a rate or a concurrency cap (try again later, as HTTP
// has it), with Retry-After when the denying window ends; a denying rule is named.
void denial(Response& res, const Decision& d, std::string_view project_id, const shm::Header& h) {
  const bool rate = d.code == Code::kRequestRateExceeded || d.code == Code::kTokenRateExceeded ||
                    d.code == Code::kConcurrencyExceeded;
  const int status = d.code == Code::kInvalidArgument ? 400
                     : d.code == Code::kUnknownReservation ? 404
                     : (d.code == Code::kLedgerFull || d.code == Code::kRegionBusy || d.code == Code::kCapacityExhausted ||
                        d.code == Code::kRegionCorrupt || d.code == Code::kLedgerUnavailable)
                         ? 503
                     : rate ? 429
                            : 402;
  json body{{"allowed", false}, {"error_code", d.errorCode()}, {"message", describe(d, project_id)}};
  if (d.rule > 0 && d.rule <= shm::kMaxRules) {
    const shm::RuleDef& def = h.rules[d.rule - 1];
    body["rule"] = std::string(def.name, std::min<std::size_t>(def.name_len, sizeof def.name));
  }
  if (d.resets_unix_ns > 0) body["resets_unix_ns"] = d.resets_unix_ns;
  if (const auto wait = retryAfterSeconds(d, h)) res.headers.emplace_back("Retry-After", std::to_string(*wait));
  reply(res, status, body);
}

// The id in /v1/reservations/{id}{suffix}: digits only, or no such reservation.
std::uint64_t reservationId(const Request& req, std::string_view suffix) {
  std::string_view s = req.path();
  s = s.substr(std::string_view("/v1/reservations/").size());
  s = s.substr(0, s.size() - suffix.size());
  std::uint64_t id = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), id);
  if (ec != std::errc{} || end != s.data() + s.size()) throw BadRequest{404, "reservation_id", "no such reservation"};
  return id;
}

int hexDigit(char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

// The id in /v1/{collection}/{id}{suffix}, taken from the raw request target and percent-decoded
// here, so that an id may hold %2F: routes match the raw path by prefix and suffix, and every
// handler takes its id from here. Throws BadRequest naming `field`.
std::string pathId(const Request& req, std::string_view prefix, std::string_view suffix, const char* field) {
  std::string_view raw = req.target;
  raw = raw.substr(0, raw.find('?'));
  if (!raw.starts_with(prefix) || !raw.ends_with(suffix) || raw.size() < prefix.size() + suffix.size()) {
    throw BadRequest{404, "path", "names no such endpoint"};
  }
  const std::string_view encoded = raw.substr(prefix.size(), raw.size() - prefix.size() - suffix.size());
  if (encoded.find('/') != std::string_view::npos) throw BadRequest{404, "path", "names no such endpoint"};
  std::string id;
  for (std::size_t i = 0; i < encoded.size(); ++i) {
    if (encoded[i] != '%') {
      id += encoded[i];
      continue;
    }
    const int hi = i + 2 < encoded.size() ? hexDigit(encoded[i + 1]) : -1;
    const int lo = hi >= 0 ? hexDigit(encoded[i + 2]) : -1;
    if (lo < 0) throw BadRequest{400, field, "has a '%' that is not followed by two hex digits"};
    id += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  if (id.empty()) throw BadRequest{400, field, "must not be empty"};
  if (id.size() > shm::kKeyMax) throw BadRequest{400, field, "may be at most " + std::to_string(shm::kKeyMax) + " bytes"};
  if (!validIdText(id)) throw BadRequest{400, field, "must be valid UTF-8 without NUL bytes"};
  return id;
}

json budgetJson(const char* key, std::string_view id, const BudgetView& v) {
  json out = {{key, id}, {"day", DayClock::format(v.day)}};
  out["used_usd"] = v.committed.toString();
  out["reserved_usd"] = v.held.toString();
  out["elsewhere_usd"] = v.elsewhere.toString();
  out["limit_usd"] = v.limit ? json(v.limit->toString()) : json(nullptr);
  if (v.limit && v.limit->count() > 0) {
    // Basis points, exact: the share of the limit that is committed or held, here or elsewhere.
    const std::int64_t used = shm::wrapAdd(shm::wrapAdd(v.committed.count(), v.held.count()), v.elsewhere.count());
    const shm::U128 bp = shm::U128{static_cast<std::uint64_t>(used)} * 10000 /
                         static_cast<std::uint64_t>(v.limit->count());
    out["usage_pct"] = static_cast<double>(static_cast<std::uint64_t>(bp)) / 100.0;   // display only
  } else {
    out["usage_pct"] = nullptr;
  }
  return out;
}

// An amount in a rule's metric: USD as the other views write it, other metrics as numbers.
json ruleAmountJson(std::uint8_t metric, std::int64_t v) {
  return metric == shm::kMetricUsd ? json(NanoUsd(v).toString()) : json(v);
}

json ruleCounterJson(const RuleUsage& r, const RuleUsage::Counter& c) {
  return {{"key", c.key},
          {"used", ruleAmountJson(r.metric, c.committed)},
          {"reserved", ruleAmountJson(r.metric, c.held)},
          {"elsewhere", ruleAmountJson(r.metric, c.elsewhere)},
          {"limit", c.limit ? ruleAmountJson(r.metric, *c.limit) : json(nullptr)},
          {"denials", c.denials}};
}

// A rule with its window; `counters` filled by the caller.
json ruleJson(const RuleUsage& r) {
  json out = {{"rule", r.number},
              {"name", r.name},
              {"scope", scopeName(static_cast<RuleScope>(r.scope))},
              {"match", r.match},
              {"metric", metricName(static_cast<RuleMetric>(r.metric))},
              {"window", windowName(r.window)},
              {"limit", r.limit ? ruleAmountJson(r.metric, *r.limit) : json(nullptr)}};
  if (r.window_end_ns != INT64_MAX) {
    out["window_start_unix_ns"] = r.window_start_ns;
    out["window_end_unix_ns"] = r.window_end_ns;
  }
  return out;
}

// A whole number from the query string, or `fallback` when absent.
std::int64_t queryNumber(const Request& req, const char* name, std::int64_t fallback, std::int64_t max) {
  const std::optional<std::string> given = req.param(name);
  if (!given) return fallback;
  const std::string& s = *given;
  std::int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size() || v < 0 || v > max) {
    throw BadRequest{400, name, "must be a whole number from 0 to " + std::to_string(max)};
  }
  return v;
}

// Compares in time that depends only on the expected value's length, so that how long a refusal
// takes does not tell a guesser how many leading characters were right.
bool sameSecret(std::string_view given, std::string_view expected) noexcept {
  unsigned diff = given.size() == expected.size() ? 0u : 1u;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const char g = i < given.size() ? given[i] : '\0';
    diff |= static_cast<unsigned char>(g ^ expected[i]);
  }
  // Through a volatile, so that the compiler cannot turn the loop into an early exit.
  volatile unsigned result = diff;
  return result == 0;
}

}  // namespace

std::string loadOrCreateToken(const std::string& path) {
  // O_NOFOLLOW: the file itself must be checked, not what a link points at.
  const int rfd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (rfd >= 0) {
    struct stat st{};
    const bool stated = ::fstat(rfd, &st) == 0;
    std::string token;
    char buf[512];
    const ssize_t n = stated ? ::read(rfd, buf, sizeof buf) : -1;
    ::close(rfd);
    if (!stated || n < 0) throw ConfigError(path + ": cannot read the admin token file");
    // Whoever can read the token can turn the kill switch off and lift every limit; whoever can
    // write it can choose the token. Only the agent's own user may do either.
    if (st.st_uid != ::geteuid()) {
      throw ConfigError(path + ": the admin token file is owned by uid " + std::to_string(st.st_uid) +
                        ", not by the agent's user (uid " + std::to_string(::geteuid()) + "): chown it to that user, " +
                        "or delete it and the agent creates a new one");
    }
    if ((st.st_mode & 077) != 0 || !S_ISREG(st.st_mode)) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      throw ConfigError(path + ": the admin token file has mode " + mode +
                        ", so group or others can read or write it: chmod 600 " + path +
                        " (and give out a new token: delete the file and restart)");
    }
    token.assign(buf, static_cast<std::size_t>(n));
    token = token.substr(0, token.find('\n'));
    if (token.size() < 16) throw ConfigError(path + ": the admin token is shorter than 16 characters");
    return token;
  }
  if (errno != ENOENT) {
    throw ConfigError(path + ": cannot open the admin token file: " + std::strerror(errno) +
                      (errno == ELOOP ? " (it is a symbolic link: use the file itself)" : ""));
  }
  std::random_device rd;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (int i = 0; i < 32; ++i) {
    const unsigned b = rd() & 0xffu;
    token += kHex[b >> 4];
    token += kHex[b & 15];
  }
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) throw ConfigError(path + ": cannot create the admin token file: " + std::strerror(errno));
  // 0600 whatever the umask: open()'s mode is masked by it, fchmod's is not.
  const std::string line = token + "\n";
  const bool ok = ::fchmod(fd, 0600) == 0 &&
                  ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) throw ConfigError(path + ": cannot write the admin token file");
  return token;
}

HttpApi::HttpApi(Agent& agent, Options options)
    : agent_(agent), admin_(agent.admin()), engine_(admin_.engine()), options_(std::move(options)),
      metrics_(admin_, agent.central() != nullptr ? &agent.central()->stats() : nullptr, &agent.alerter().stats(),
               &agent.capacityStats()) {
  if (options_.proxy.enabled()) {
    proxy_ = std::make_unique<Proxy>(options_.proxy, engine_, admin_.header());
    metrics_.add(proxy_->metrics());
  }
  http::Server::Options o;
  o.host = options_.host;
  o.port = options_.port;
  o.unix_socket = options_.unix_socket;
  o.threads = options_.threads;
  o.limits = options_.limits;
  // Pooled upstream sockets belong to the server's event loop: closed before it goes.
  if (proxy_) o.after_stop = [this] { proxy_->dropIdleConnections(); };
  server_ = std::make_unique<http::Server>(routes(), std::move(o));
  metrics_.setHttpStats(&server_->stats());
}

HttpApi::~HttpApi() {
  server_.reset();   // joins its threads before the handlers' objects go
}

namespace {

// Runs a handler, turning what it throws into the API's JSON errors.
void answer(const std::function<void(const Request&, Response&)>& handler, const Request& req, Response& res) {
  try {
    handler(req, res);
  } catch (const BadRequest& e) {
    reply(res, e.status, {{"error", e.status == 404 ? "not_found" : e.status == 401 ? "unauthorized" : e.status == 409 ? "conflict" : "bad_request"},
                          {"field", e.field},
                          {"message", e.field + " " + e.message}});
  } catch (const RuleConflictError& e) {
    reply(res, 409, {{"error", "conflict"}, {"message", e.what()}});
  } catch (const NotSavedError& e) {
    reply(res, 503, {{"error", "not_saved"}, {"applied", true}, {"message", e.what()}});
  } catch (const LedgerError& e) {
    reply(res, 503, {{"error", "unavailable"}, {"applied", false}, {"message", e.what()}});
  } catch (const LinkError& e) {
    reply(res, 503, {{"error", "unavailable"}, {"applied", false}, {"message", e.what()}});
  } catch (const std::exception& e) {
    reply(res, 500, {{"error", "internal"}, {"message", e.what()}});
  }
}

}  // namespace

http::Router HttpApi::routes() {
  http::Router router;
  using Run = http::Router::Run;
  auto on = [&router](const char* method, std::string path, std::function<void(const Request&, Response&)> h,
                      Run run = Run::kOnLoop) {
    router.exact(method, std::move(path), [h = std::move(h)](const Request& q, Response& r) { answer(h, q, r); }, run);
  };
  // Routes on the raw path: {id} is one or more bytes, taken and decoded by the handler.
  auto on_id = [&router](const char* method, std::string prefix, std::string suffix,
                         std::function<void(const Request&, Response&)> h, Run run = Run::kOnLoop) {
    router.pattern(method, std::move(prefix), std::move(suffix),
                   [h = std::move(h)](const Request& q, Response& r) { answer(h, q, r); }, run);
  };
  auto admin_only = [this](const Request& req) {
    if (!sameSecret(req.header("Authorization"), "Bearer " + options_.admin_token)) {
      throw BadRequest{401, "Authorization", "must be 'Bearer <token>' with the token from the agent's token file"};
    }
  };

  if (proxy_) proxy_->addRoutes(router);

  on("GET", "/healthz", [this](const Request&, Response& res) {
    reply(res, 200, {{"status", "ok"}, {"day", DayClock::format(admin_.day())}, {"kill_switch", engine_.killed()}});
  });

  on("POST", "/v1/check", [this](const Request& req, Response& res) {
    const json b = parseBody(req);
    const std::string project = text(b, "project_id", true), model = text(b, "model", true);
    const std::string run = text(b, "run_id", false), agent = text(b, "agent_id", false);
    const std::int64_t est = count(b, "estimated_prompt_tokens", false, 4000, kMaxTokensPerCall);
    const std::string tags = text(b, "tags", false, kMaxTagBytes);
    CallSite site;
    Call call{project, model, run, agent, est, 0, 0};
    call.tags = tags;
    Decision d = engine_.prepare(call, &site, false);
    if (d.allowed()) d = engine_.check(site, est, 0);
    metrics_.decision(Metrics::Endpoint::kCheck, d.code);
    if (!d.allowed()) return denial(res, d, project, admin_.header());
    reply(res, 200, {{"allowed", true}, {"estimated_cost_usd", d.cost.toString()}});
  });

  on("POST", "/v1/reservations", [this](const Request& req, Response& res) {
    const json b = parseBody(req);
    const std::string project = text(b, "project_id", true), model = text(b, "model", true);
    const std::string run = text(b, "run_id", false), agent = text(b, "agent_id", false);
    const std::int64_t prompt = count(b, "estimated_prompt_tokens", true, 0, kMaxTokensPerCall);
    const std::int64_t completion = count(b, "estimated_completion_tokens", false, 0, kMaxTokensPerCall);
    const std::int64_t ttl_s = count(b, "ttl_s", false, 0, 7 * 86400);
    const std::string tags = text(b, "tags", false, kMaxTagBytes);
    CallSite site;
    Reservation r;
    Call call{project, model, run, agent, prompt, completion, 0};
    call.tags = tags;
    Decision d = engine_.prepare(call, &site, true);
    if (d.allowed()) d = engine_.reserve(site, prompt, completion, ttl_s * 1000, &r);
    metrics_.decision(Metrics::Endpoint::kReserve, d.code);
    if (!d.allowed()) return denial(res, d, project, admin_.header());
    const std::int64_t ttl_ns =
        ttl_s > 0 ? ttl_s * 1'000'000'000 : admin_.header().defaults.reservation_ttl_ns.load();
    reply(res, 201, {{"reservation_id", std::to_string(r.id)},
                     {"reserved_usd", d.cost.toString()},
                     {"expires_at_unix_ms", shm::wrapAdd(admin_.header().clock_unix_ns.load(), ttl_ns) / 1'000'000}});
  });

  on_id("POST", "/v1/reservations/", "/commit", [this](const Request& req, Response& res) {
    const std::uint64_t id = reservationId(req, "/commit");
    const json b = parseBody(req);
    const std::string provider = text(b, "provider", false);
    const std::int64_t prompt = count(b, "prompt_tokens", true, 0, kMaxTokensPerCall);
    const std::int64_t completion = count(b, "completion_tokens", true, 0, kMaxTokensPerCall);
    const Decision d = engine_.commit({id}, provider, prompt, completion);
    metrics_.decision(Metrics::Endpoint::kCommit, d.code);
    if (!d.allowed()) return denial(res, d, {}, admin_.header());
    reply(res, 200, {{"cost_usd", d.cost.toString()},
                     {"ledger_seq", d.ledger_seq},
                     {"reservation_expired", d.reservation_expired}});
  });

  on_id("POST", "/v1/reservations/", "/charge", [this](const Request& req, Response& res) {
    const std::uint64_t id = reservationId(req, "/charge");
    const json b = parseBody(req);
    const std::int64_t prompt = count(b, "prompt_tokens", false, 0, kMaxTokensPerCall);
    const std::int64_t completion = count(b, "completion_tokens", true, 0, kMaxTokensPerCall);
    const Decision d = engine_.charge({id}, prompt, completion);
    metrics_.decision(Metrics::Endpoint::kCharge, d.code);
    if (!d.allowed()) return denial(res, d, {}, admin_.header());
    reply(res, 200, {{"allowed", true}, {"consumed_usd", d.cost.toString()}});
  });

  on_id("DELETE", "/v1/reservations/", "", [this](const Request& req, Response& res) {
    const Decision d = engine_.release({reservationId(req, "")});
    metrics_.decision(Metrics::Endpoint::kRelease, d.code);
    if (!d.allowed()) return denial(res, d, {}, admin_.header());
    res.status = 204;
  });

  on("POST", "/v1/usage", [this](const Request& req, Response& res) {
    const json b = parseBody(req);
    const std::string project = text(b, "project_id", true), model = text(b, "model", true);
    const std::string provider = text(b, "provider", true);
    const std::string run = text(b, "run_id", false), agent = text(b, "agent_id", false);
    const std::int64_t prompt = count(b, "prompt_tokens", true, 0, kMaxTokensPerCall);
    const std::int64_t completion = count(b, "completion_tokens", true, 0, kMaxTokensPerCall);
    const std::string tags = text(b, "tags", false, kMaxTagBytes);
    const Decision d = engine_.record({project, model, provider, run, agent, prompt, completion, tags});
    metrics_.decision(Metrics::Endpoint::kUsage, d.code);
    if (d.code == Code::kCapacityExhausted && d.ledger_seq != 0) {
      // Booked (do not retry), but not counted against the tenant's or run's limit: no table room.
      return reply(res, 201, {{"cost_usd", d.cost.toString()},
                              {"ledger_seq", d.ledger_seq},
                              {"error_code", d.errorCode()},
                              {"message", "booked in the ledger, but not counted against the limit of its tenant or "
                                          "run: the region's table is full"}});
    }
    if (!d.allowed()) return denial(res, d, project, admin_.header());
    reply(res, 201, {{"cost_usd", d.cost.toString()}, {"ledger_seq", d.ledger_seq}});
  });

  // Ids in paths: pathId() takes them from the raw target (an id may hold '/' as %2F).
  on_id("GET", "/v1/tenants/", "", [this](const Request& req, Response& res) {
    const std::string id = pathId(req, "/v1/tenants/", "", "project_id");
    json out = budgetJson("project_id", id, engine_.tenant(id));
    // The rules that count this tenant's calls, each with the tenant's counters (the whole rule
    // table is read: on the blocking pool).
    json rules = json::array();
    for (const RuleUsage& r : admin_.rules()) {
      const bool per_tenant = r.scope == shm::kScopeTenant || r.scope == shm::kScopeTenantModel ||
                              r.scope == shm::kScopeTenantAgent;
      if (!per_tenant) continue;
      json counters = json::array();
      // A tenant prefix group has one counter for all its tenants, under no key.
      const bool group = r.scope == shm::kScopeTenant && r.match.ends_with('*');
      for (const RuleUsage::Counter& c : r.counters) {
        if (c.first == (group ? std::string() : id)) counters.push_back(ruleCounterJson(r, c));
      }
      const bool applies = r.match.empty() || r.scope != shm::kScopeTenant ||
                           (r.match.ends_with('*') ? id.starts_with(r.match.substr(0, r.match.size() - 1)) : id == r.match);
      if (!applies) continue;
      json j = ruleJson(r);
      j["counters"] = std::move(counters);
      rules.push_back(std::move(j));
    }
    out["rules"] = std::move(rules);
    reply(res, 200, out);
  }, Run::kBlocking);
  on_id("GET", "/v1/runs/", "", [this](const Request& req, Response& res) {
    const std::string id = pathId(req, "/v1/runs/", "", "run_id");
    reply(res, 200, budgetJson("run_id", id, engine_.run(id)));
  });
  // Every rule with every counter it has (one pass over the rule table), where it comes from,
  // and the config file's rules that the admin API removed.
  auto rules_json = [this] {
    const Agent::RuleSources sources = agent_.ruleSources();
    json rules = json::array();
    for (const RuleUsage& r : admin_.rules()) {
      json j = ruleJson(r);
      const auto source = sources.of.find(r.name);
      j["source"] = source == sources.of.end() ? "config" : source->second;
      json counters = json::array();
      for (const RuleUsage::Counter& c : r.counters) counters.push_back(ruleCounterJson(r, c));
      j["counters"] = std::move(counters);
      rules.push_back(std::move(j));
    }
    return json{{"rules", std::move(rules)}, {"removed", sources.removed}};
  };
  on("GET", "/v1/rules", [rules_json](const Request&, Response& res) { reply(res, 200, rules_json()); },
     Run::kBlocking);
  // PUT /v1/rules/{name} {a [[rules]] table as JSON}: makes or replaces the rule; DELETE takes it
  // out of force (the config file's too); DELETE /v1/rules/{name}/override forgets the change.
  // Saved in ledger.db, as limits are; the reply is GET /v1/rules.
  auto rule_name = [](const Request& req, std::string_view suffix) {
    const std::string name = pathId(req, "/v1/rules/", suffix, "name");
    if (auto p = ruleNameProblem(name); !p.empty()) throw BadRequest{400, "name", p};
    return name;
  };
  on_id("PUT", "/v1/rules/", "", [this, admin_only, rule_name, rules_json](const Request& req, Response& res) {
    admin_only(req);
    const std::string name = rule_name(req, "");
    RuleSpec rule;
    try {
      rule = ruleFromJson(name, parseBody(req));
    } catch (const ConfigError& e) {
      throw BadRequest{400, e.key(), e.problem()};
    }
    std::string warning;
    if (Status st = agent_.putRule(rule, &warning); !st.ok()) throw BadRequest{409, "name", st.message()};
    json out = rules_json();
    if (!warning.empty()) out["warning"] = warning;
    reply(res, 200, out);
  }, Run::kBlocking);
  on_id("DELETE", "/v1/rules/", "/override", [this, admin_only, rule_name, rules_json](const Request& req, Response& res) {
    admin_only(req);
    if (Status st = agent_.resetRule(rule_name(req, "/override")); !st.ok()) throw BadRequest{404, "name", st.message()};
    reply(res, 200, rules_json());
  }, Run::kBlocking);
  on_id("DELETE", "/v1/rules/", "", [this, admin_only, rule_name, rules_json](const Request& req, Response& res) {
    admin_only(req);
    if (Status st = agent_.removeRule(rule_name(req, "")); !st.ok()) throw BadRequest{404, "name", st.message()};
    reply(res, 200, rules_json());
  }, Run::kBlocking);
  on("GET", "/v1/platform", [this](const Request&, Response& res) {
    reply(res, 200, budgetJson("scope", "platform", engine_.platform()));
  });
  // GET /v1/tenants?limit=: today's tenants, those nearest their daily limit first, then the
  // unlimited ones spending most (one pass over the tenant table).
  on("GET", "/v1/tenants", [this](const Request& req, Response& res) {
    json tenants = json::array();
    for (const auto& [id, v] : admin_.tenantsNearestLimit(static_cast<std::size_t>(queryNumber(req, "limit", 100, 100000)))) {
      tenants.push_back(budgetJson("project_id", id, v));
    }
    reply(res, 200, {{"tenants", std::move(tenants)}});
  }, Run::kBlocking);
  // GET /v1/reservations?limit=: the reservations holding budget now, the soonest to expire first.
  on("GET", "/v1/reservations", [this](const Request& req, Response& res) {
    const std::size_t limit = static_cast<std::size_t>(queryNumber(req, "limit", 100, 100000));
    json out = json::array();
    for (const LiveReservation& r : admin_.liveReservations(limit)) {
      auto optional = [](const std::string& s) { return s.empty() ? json(nullptr) : json(s); };
      out.push_back({{"reservation_id", std::to_string(r.id)},
                     {"project_id", r.project_id},
                     {"run_id", optional(r.run_id)},
                     {"model", r.model},
                     {"agent_id", optional(r.agent_id)},
                     {"held_usd", NanoUsd(r.held_nano_usd).toString()},
                     {"prompt_tokens", r.prompt_tokens},
                     {"completion_tokens", r.completion_tokens},
                     {"streaming", r.charging},
                     {"expires_at", isoTime(r.deadline_unix_ns)},
                     {"owner_pid", r.owner_pid}});
    }
    reply(res, 200, {{"reservations", std::move(out)},
                     {"live", engine_.liveReservations()}});
  }, Run::kBlocking);
  // GET /v1/alerts?limit=: the threshold alerts fired (tenant, run, platform, rule), newest first.
  on("GET", "/v1/alerts", [this](const Request& req, Response& res) {
    json out = json::array();
    for (const FiredAlert& a : Ledger::openReadOnly(agent_.ledgerPath())->alertsFired(queryNumber(req, "limit", 50, 10000))) {
      out.push_back({{"scope", a.scope}, {"id", a.id}, {"level_pct", a.level_pct}, {"fired_at", isoTime(a.fired_unix_ns)}});
    }
    reply(res, 200, {{"alerts", std::move(out)}});
  }, Run::kBlocking);
  // GET /v1/spend/hourly?from=&to= (unix seconds; default: the budget day so far): each tenant's
  // spending per clock hour, from the ledger.
  on("GET", "/v1/spend/hourly", [this](const Request& req, Response& res) {
    const std::int64_t now_s = toUnixNs(std::chrono::system_clock::now()) / 1'000'000'000;
    const std::int64_t from = queryNumber(req, "from", agent_.budgetDayStartNs() / 1'000'000'000, INT64_MAX / 2);
    const std::int64_t to = queryNumber(req, "to", now_s + 3600, INT64_MAX / 2);
    json hours = json::array();
    for (const HourSpend& h : Ledger::openReadOnly(agent_.ledgerPath())->spendByHour(from / 3600, (to + 3599) / 3600)) {
      hours.push_back({{"hour", isoTime(h.hour * 3'600'000'000'000)},
                       {"project_id", h.project_id},
                       {"cost_usd", NanoUsd(h.cost_nano_usd).toString()},
                       {"prompt_tokens", h.prompt_tokens},
                       {"completion_tokens", h.completion_tokens},
                       {"calls", h.calls}});
    }
    reply(res, 200, {{"from", isoTime(from * 1'000'000'000)}, {"to", isoTime(to * 1'000'000'000)}, {"hours", std::move(hours)}});
  }, Run::kBlocking);

  // PUT /v1/tenants/{id}/limit {"daily_limit_usd"}, PUT /v1/runs/{id}/limit {"limit_usd"},
  // PUT /v1/platform/limit {"daily_limit_usd"}; DELETE of each goes back to the config file.
  auto view_of = [this](Agent::Scope scope, const std::string& id) {
    return scope == Agent::Scope::kTenant ? budgetJson("project_id", id, engine_.tenant(id))
           : scope == Agent::Scope::kRun  ? budgetJson("run_id", id, engine_.run(id))
                                          : budgetJson("scope", "platform", engine_.platform());
  };
  auto prefixOf = [](Agent::Scope scope) { return scope == Agent::Scope::kTenant ? "/v1/tenants/" : "/v1/runs/"; };
  auto put_limit = [this, admin_only, view_of, prefixOf](Agent::Scope scope, const char* id_field, const char* limit_field) {
    return [=, this](const Request& req, Response& res) {
      admin_only(req);
      const std::string id = scope == Agent::Scope::kPlatform ? std::string() : pathId(req, prefixOf(scope), "/limit", id_field);
      const std::optional<NanoUsd> limit = limitField(parseBody(req), limit_field);
      if (Status st = agent_.setLimit(scope, id, limit); !st.ok()) throw BadRequest{400, id_field, st.message()};
      reply(res, 200, view_of(scope, id));
    };
  };
  auto reset_limit = [this, admin_only, view_of, prefixOf](Agent::Scope scope, const char* id_field) {
    return [=, this](const Request& req, Response& res) {
      admin_only(req);
      const std::string id = scope == Agent::Scope::kPlatform ? std::string() : pathId(req, prefixOf(scope), "/limit", id_field);
      if (Status st = agent_.resetLimit(scope, id); !st.ok()) throw BadRequest{400, id_field, st.message()};
      reply(res, 200, view_of(scope, id));
    };
  };
  // Admin changes save to SQLite: on the blocking pool, never on the event loop.
  on("PUT", "/v1/platform/limit", put_limit(Agent::Scope::kPlatform, "scope", "daily_limit_usd"), Run::kBlocking);
  on("DELETE", "/v1/platform/limit", reset_limit(Agent::Scope::kPlatform, "scope"), Run::kBlocking);
  on_id("PUT", "/v1/tenants/", "/limit", put_limit(Agent::Scope::kTenant, "project_id", "daily_limit_usd"),
        Run::kBlocking);
  on_id("PUT", "/v1/runs/", "/limit", put_limit(Agent::Scope::kRun, "run_id", "limit_usd"), Run::kBlocking);
  on_id("DELETE", "/v1/tenants/", "/limit", reset_limit(Agent::Scope::kTenant, "project_id"), Run::kBlocking);
  on_id("DELETE", "/v1/runs/", "/limit", reset_limit(Agent::Scope::kRun, "run_id"), Run::kBlocking);

  auto kill_json = [this] {
    const KillSwitchState k = engine_.killSwitch();
    return json{{"active", k.active},
                {"reason", k.reason},
                {"since_unix_ms", k.since_unix_ns / 1'000'000},
                {"expires_at_unix_ms", k.expires_unix_ns == 0 ? json(nullptr) : json(k.expires_unix_ns / 1'000'000)}};
  };
  on("GET", "/v1/kill", [kill_json](const Request&, Response& res) { reply(res, 200, kill_json()); });
  on("PUT", "/v1/kill", [this, admin_only, kill_json](const Request& req, Response& res) {
    admin_only(req);
    const json b = parseBody(req);
    const std::string reason = text(b, "reason", true, 256);
    const std::int64_t ttl_s = count(b, "ttl_s", false, 7 * 86400, 365 * 86400);   // the reference: 7 days
    agent_.setKill(reason, ttl_s);
    reply(res, 200, kill_json());
  }, Run::kBlocking);
  on(
      "DELETE", "/v1/kill",
      [this, admin_only](const Request& req, Response& res) {
        admin_only(req);
        agent_.clearKill();
        res.status = 204;
      },
      Run::kBlocking);

  // GET /v1/ledger?project_id=&run_id=&since_seq=&limit=&order=: durable entries, oldest first
  // (order=desc: the newest `limit`, newest first).
  on("GET", "/v1/ledger", [this, admin_only](const Request& req, Response& res) {
    admin_only(req);
    LedgerFilter f;
    if (auto v = req.param("project_id")) f.project_id = std::move(*v);
    if (auto v = req.param("run_id")) f.run_id = std::move(*v);
    f.after_seq = static_cast<std::uint64_t>(queryNumber(req, "since_seq", 0, INT64_MAX));
    f.limit = queryNumber(req, "limit", 1000, 10000);
    if (auto v = req.param("order")) {
      if (*v != "asc" && *v != "desc") throw BadRequest{400, "order", "must be asc or desc"};
      f.newest_first = *v == "desc";
    }
    const std::vector<LedgerEntry> rows = Ledger::openReadOnly(agent_.ledgerPath())->list(f);
    json entries = json::array();
    for (const LedgerEntry& e : rows) entries.push_back(toJson(e));
    reply(res, 200, {{"entries", std::move(entries)},
                     {"next_since_seq", rows.empty() ? f.after_seq : rows.back().seq},
                     {"durable_seq", engine_.durableLedgerSeq()}});
  }, Run::kBlocking);

  // The dashboard (docs/operations.md, "Dashboard"): three files compiled in. The policy tells
  // the browser too that the page loads and connects to nothing but this agent, and may not be
  // framed (its kill switch button).
  for (const ui::Asset& a : ui::kAssets) {
    on("GET", std::string(a.path), [&a](const Request&, Response& res) {
      res.body = a.body;
      res.content_type = a.content_type;
      res.headers = {{"Content-Security-Policy",
                      "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
                      "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"},
                     {"X-Content-Type-Options", "nosniff"},
                     {"X-Frame-Options", "DENY"},
                     {"Referrer-Policy", "no-referrer"},
                     {"Cache-Control", "no-cache"}};
    });
  }

  on(
      "GET", "/metrics",
      [this](const Request&, Response& res) {
        res.body = metrics_.scrape();
        res.content_type = "text/plain; version=0.0.4";
      },
      Run::kBlocking);
  return router;
}

}  // namespace tokenfuse
