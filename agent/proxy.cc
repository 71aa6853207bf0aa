#include "proxy.h"

#include "engine.h"
#include "ids.h"
#include "layout.h"
#include "llm_wire.h"
#include "log.h"
#include "upstream.h"

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <cctype>
#include <chrono>

namespace tokenfuse {

namespace net = boost::asio;
using nlohmann::json;
using proxy::ErrorReply;
using proxy::Family;

std::optional<std::int64_t> retryAfterSeconds(const Decision& d, const shm::Header& h) {
  if (d.resets_unix_ns <= 0) return std::nullopt;
  // Both are region words: a difference that overflows (written from outside) gets no answer
  // rather than a wrong one.
  const std::int64_t now_ns = h.clock_unix_ns.load(std::memory_order_relaxed);   // the agent's clock, as the window's
  std::int64_t left_ns = 0;
  if (__builtin_sub_overflow(d.resets_unix_ns, now_ns, &left_ns) || left_ns >= INT64_MAX - 999'999'999) return std::nullopt;
  return std::max<std::int64_t>(1, (left_ns + 999'999'999) / 1'000'000'000);
}

namespace proxy {

// One upstream's counters (exported as tokenfuse_proxy_*{upstream="<name>"}).
struct Metrics {
  enum Outcome { kOk, kDenied, kCut, kClientGone, kUpstreamFailed, kUpstreamStatus, kRefused, kOutcomes };
  static constexpr const char* kOutcomeNames[kOutcomes] = {"ok", "denied", "cut", "client_gone", "upstream_failed",
                                                           "upstream_status", "refused"};
  prometheus::Counter* requests[kOutcomes];
  prometheus::Counter* prompt_tokens;
  prometheus::Counter* completion_tokens;
  prometheus::Counter* cost_usd;
  prometheus::Counter* streams_cut;
  prometheus::Counter* estimated;
  prometheus::Counter* not_booked;
  prometheus::Counter* errors[4];   // UpstreamError::Kind
  prometheus::Gauge* streams_open;
  prometheus::Histogram* duration;
  prometheus::Histogram* first_byte;
};

}  // namespace proxy

namespace {


std::string sha256Hex(std::string_view s) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(s.data(), s.size(), md, &len, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += kHex[md[i] >> 4];
    out += kHex[md[i] & 15];
  }
  return out;
}

bool oneOf(std::string_view name, std::initializer_list<std::string_view> names) {
  for (std::string_view h : names) {
    if (http::iequals(name, h)) return true;
  }
  return false;
}

// Headers that belong to one hop, or that the proxy sets itself: never forwarded either way.
bool hopHeader(std::string_view name) {
  return oneOf(name, {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
                      "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect", "content-encoding"});
}

// A client's header the upstream must not see: its credentials (the operator's key is sent
// instead), what would choose which of the operator's accounts pays, and what says where the
// client is.
bool clientOnlyHeader(std::string_view name) {
  return hopHeader(name) ||
         oneOf(name, {"authorization", "x-api-key", "api-key", "cookie", "accept-encoding", "openai-organization",
                      "openai-project", "forwarded", "x-real-ip"}) ||
         (name.size() >= 12 && http::iequals(name.substr(0, 12), "x-forwarded-"));
}

// An upstream's header a client must not see: the operator's account, cookies, and rate-limit
// counts that tell one tenant about the others' use.
bool upstreamOnlyHeader(std::string_view name) {
  return hopHeader(name) || oneOf(name, {"set-cookie", "openai-organization", "openai-project", "anthropic-organization-id",
                                         "content-type", "cache-control"}) ||
         (name.size() >= 12 && http::iequals(name.substr(0, 12), "x-ratelimit-")) ||
         (name.size() >= 21 && http::iequals(name.substr(0, 21), "anthropic-ratelimit-"));
}

// "budget" for a spending limit or the kill switch, "rate" for a rate or concurrency cap, and
// what the rest are to a client (errorReply's kinds).
const char* denialKind(Code c) {
  switch (c) {
    case Code::kRunBudgetExhausted:
    case Code::kTenantBudgetExhausted:
    case Code::kPlatformBudgetExhausted:
    case Code::kEmergencyKill:
    case Code::kModelBudgetExhausted:
    case Code::kAgentBudgetExhausted:
    case Code::kTagBudgetExhausted: return "budget";
    case Code::kRequestRateExceeded:
    case Code::kTokenRateExceeded:
    case Code::kConcurrencyExceeded: return "rate";
    case Code::kInvalidArgument: return "bad_request";
    default: return "unavailable";
  }
}

constexpr std::int64_t kMinTtlMs = 3'600'000;   // a proxied call's reservation lives at least an hour

}  // namespace

namespace {

proxy::Headers forwardHeaders(const http::Request& req, const ProxyConfig& config) {
  proxy::Headers headers;
  for (const auto& [k, v] : req.headers) {
    if (clientOnlyHeader(k) || http::iequals(k, config.tenant_header) || http::iequals(k, config.run_header) ||
        http::iequals(k, config.agent_header) || http::iequals(k, config.tags_header)) {
      continue;
    }
    headers.emplace_back(k, v);
  }
  headers.emplace_back("Accept-Encoding", "identity");   // the proxy reads the answer
  return headers;
}

// The upstream's response headers a client may see.
std::vector<std::pair<std::string, std::string>> replyHeaders(const proxy::Exchange& ex) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [k, v] : ex.headers()) {
    if (!upstreamOnlyHeader(k)) out.emplace_back(k, v);
  }
  return out;
}

// An answer the proxy cannot read (it asked for identity): its cost could not be known.
bool encoded(const proxy::Exchange& ex) {
  const std::string e = ex.header("Content-Encoding");
  return !e.empty() && !http::iequals(e, "identity");
}

bool contains(std::string_view haystack, std::string_view needle) {
  return std::search(haystack.begin(), haystack.end(), needle.begin(), needle.end(), [](char a, char b) {
           return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b));
         }) != haystack.end();
}

}  // namespace

struct Proxy::Payer {
  std::string tenant, run, agent, tags;
};

struct Proxy::Call {
  explicit Call(const http::Request& r) : request(r) {}
  const http::Request& request;
  proxy::Upstream* upstream = nullptr;
  proxy::Metrics* m = nullptr;
  proxy::Route route{};
  std::string rest;   // path and query after /proxy/<name>
  Payer payer;
  json body;
  proxy::RequestFacts facts;
  std::string model;   // priced and booked: the upstream's model_prefix + the request's model
  double chars_per_token = 4.0;
  std::int64_t prompt_estimate = 0;
  std::int64_t completion_hold = 0;
  Reservation reservation;
  bool settled = true;
  std::int64_t charged_prompt = 0, charged_completion = 0;   // a stream's tokens charged (delivered) so far
  bool added_usage = false;   // the proxy asked an OpenAI stream for its usage chunk
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();

  Family family() const { return route.family; }
};

Proxy::Proxy(const ProxyConfig& config, Engine& engine, const shm::Header& header)
    : config_(config), engine_(engine), header_(header), registry_(std::make_shared<prometheus::Registry>()) {
  for (const VirtualKeyConfig& k : config_.keys) keys_.emplace(k.sha256, &k);
  // Each family once: the builder, its name and its help.
  auto family = [this](auto builder, const char* name, const char* help) -> auto& {
    return builder.Name(name).Help(help).Register(*registry_);
  };
  auto& requests = family(prometheus::BuildCounter(), "tokenfuse_proxy_requests_total",
                        "Calls through the LLM proxy, by upstream and outcome");
  auto& tokens = family(prometheus::BuildCounter(), "tokenfuse_proxy_tokens_total",
                        "Tokens booked for proxied calls, by upstream and kind (prompt, completion)");
  auto& cost = family(prometheus::BuildCounter(), "tokenfuse_proxy_cost_usd_total",
                        "Cost booked for proxied calls, by upstream");
  auto& cut = family(prometheus::BuildCounter(), "tokenfuse_proxy_streams_cut_total",
                        "Streams ended by the proxy because the next chunk would have crossed a limit");
  auto& estimated = family(prometheus::BuildCounter(), "tokenfuse_proxy_usage_estimated_total",
                        "Calls booked from the proxy's estimate because the upstream reported no usage");
  auto& not_booked = family(prometheus::BuildCounter(), "tokenfuse_proxy_not_booked_total",
                        "Calls made whose cost the ledger could not take (see the agent's log)");
  auto& errors = family(prometheus::BuildCounter(), "tokenfuse_proxy_upstream_errors_total",
                        "Upstream failures, by upstream and kind (connect, timeout, protocol, too_large)");
  auto& open = family(prometheus::BuildGauge(), "tokenfuse_proxy_streams_open",
                        "Streamed calls in progress, by upstream");
  auto& duration = family(prometheus::BuildHistogram(), "tokenfuse_proxy_request_duration_seconds",
                        "Whole proxied calls, from the request to the last byte, by upstream");
  auto& first = family(prometheus::BuildHistogram(), "tokenfuse_proxy_upstream_first_byte_seconds",
                        "From the request to the upstream's response headers, by upstream");
  const prometheus::Histogram::BucketBoundaries buckets{0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1,
                                                        0.5,    1,      2.5,   5,     10,   30,   60, 300};
  for (const UpstreamConfig& u : config_.upstreams) {
    upstreams_.push_back(std::make_unique<proxy::Upstream>(u));
    auto m = std::make_unique<proxy::Metrics>();
    for (int i = 0; i < proxy::Metrics::kOutcomes; ++i) {
      m->requests[i] = &requests.Add({{"upstream", u.name}, {"outcome", proxy::Metrics::kOutcomeNames[i]}});
    }
    m->prompt_tokens = &tokens.Add({{"upstream", u.name}, {"kind", "prompt"}});
    m->completion_tokens = &tokens.Add({{"upstream", u.name}, {"kind", "completion"}});
    m->cost_usd = &cost.Add({{"upstream", u.name}});
    m->streams_cut = &cut.Add({{"upstream", u.name}});
    m->estimated = &estimated.Add({{"upstream", u.name}});
    m->not_booked = &not_booked.Add({{"upstream", u.name}});
    const char* kinds[] = {"connect", "timeout", "protocol", "too_large"};
    for (int i = 0; i < 4; ++i) m->errors[i] = &errors.Add({{"upstream", u.name}, {"kind", kinds[i]}});
    m->streams_open = &open.Add({{"upstream", u.name}});
    m->duration = &duration.Add({{"upstream", u.name}}, buckets);
    m->first_byte = &first.Add({{"upstream", u.name}}, buckets);
    metrics_.push_back(std::move(m));
  }
}

Proxy::~Proxy() = default;

std::shared_ptr<prometheus::Collectable> Proxy::metrics() const { return registry_; }

void Proxy::dropIdleConnections() {
  for (const auto& u : upstreams_) u->dropIdle();
}

void Proxy::addRoutes(http::Router& router) {
  const auto max_body = static_cast<std::size_t>(config_.max_request_bytes);
  for (const char* method : {"GET", "POST"}) {
    router.streamPrefix(method, "/proxy/",
                        [this](const http::Request& q, http::Stream& out) { return serve(q, out); }, max_body);
  }
}

double Proxy::charsPerToken(std::string_view model) const {
  if (const auto it = config_.model_chars_per_token.find(model); it != config_.model_chars_per_token.end()) return it->second;
  std::size_t best = 0;
  double ratio = config_.chars_per_token;
  for (const auto& [pattern, v] : config_.model_chars_per_token) {
    if (pattern.ends_with('*') && pattern.size() - 1 >= best && model.starts_with(std::string_view(pattern).substr(0, pattern.size() - 1))) {
      best = pattern.size() - 1;
      ratio = v;
    }
  }
  return ratio;
}

std::string Proxy::identify(const http::Request& req, Payer* payer) const {
  std::string key;
  if (const std::string auth = req.header("Authorization"); auth.size() > 7 && http::iequals(auth.substr(0, 7), "Bearer ")) {
    key = auth.substr(7);
  } else if (std::string k = req.header("x-api-key"); !k.empty()) {
    key = std::move(k);
  }
  const VirtualKeyConfig* vk = nullptr;
  if (!keys_.empty() && !key.empty()) {
    if (const auto it = keys_.find(sha256Hex(key)); it != keys_.end()) vk = it->second;
  }
  // With virtual keys configured, a key the proxy does not know is refused rather than ignored:
  // a revoked key must not fall back to paying by header.
  if (vk == nullptr && (config_.require_key || (!keys_.empty() && !key.empty()))) {
    return key.empty() ? "auth:this proxy needs a virtual key (Authorization: Bearer <key>, or x-api-key)"
                       : "auth:the key is not one of this proxy's virtual keys";
  }
  payer->run = req.header(config_.run_header);
  payer->agent = req.header(config_.agent_header);
  payer->tags = req.header(config_.tags_header);
  if (vk != nullptr) {
    payer->tenant = vk->tenant;   // a key's tenant: headers cannot make another tenant pay
    if (!vk->agent.empty()) payer->agent = vk->agent;
    if (!vk->tags.empty()) payer->tags = payer->tags.empty() ? vk->tags : vk->tags + "," + payer->tags;
    return "";
  }
  payer->tenant = req.header(config_.tenant_header);
  if (payer->tenant.empty()) payer->tenant = config_.default_tenant;
  if (payer->tenant.empty()) {
    return "bad_request:the call names no tenant: send " + config_.tenant_header +
           ", use a virtual key, or set proxy.default_tenant";
  }
  return "";
}

net::awaitable<void> Proxy::serve(const http::Request& req, http::Stream& out) {
  // /proxy/<upstream><rest>
  std::string_view target = req.target;
  target.remove_prefix(std::string_view("/proxy/").size());
  const std::size_t slash = target.find('/');
  const std::string_view name = target.substr(0, slash);
  std::size_t index = 0;
  while (index < upstreams_.size() && upstreams_[index]->config().name != name) ++index;
  if (index == upstreams_.size() || slash == std::string_view::npos) {
    const ErrorReply e = proxy::errorReply(Family::kOpenAi, "not_found", {},
                                           "no upstream is named \"" + std::string(name) + "\" in [[proxy.upstreams]]");
    co_await out.respond(e.status, "application/json", e.body);
    co_return;
  }
  Call call(req);
  call.upstream = upstreams_[index].get();
  call.m = metrics_[index].get();
  call.rest = std::string(target.substr(slash));
  const std::string_view path = std::string_view(call.rest).substr(0, call.rest.find('?'));
  const UpstreamConfig& up = call.upstream->config();
  const std::optional<proxy::Route> route = proxy::route(up.kind, req.method, path);
  if (!route) {
    const ErrorReply e = proxy::errorReply(proxy::familyOf(up.kind, path), "not_found", {},
                                           req.method + " " + std::string(path) + " is not an endpoint the proxy serves for a " +
                                               up.kind + " upstream (docs/proxy.md)");
    call.m->requests[proxy::Metrics::kRefused]->Increment();
    co_await out.respond(e.status, "application/json", e.body);
    co_return;
  }
  call.route = *route;
  auto refuse = [&](std::string_view kind, std::string_view message) -> net::awaitable<void> {
    const ErrorReply e = proxy::errorReply(call.family(), kind, {}, message);
    call.m->requests[proxy::Metrics::kRefused]->Increment();
    co_await out.respond(e.status, "application/json", e.body);
  };
  // A listing of models costs nothing: only a required key is asked for.
  if (const std::string why = identify(req, &call.payer); !why.empty() && (route->metered || why.starts_with("auth:"))) {
    const std::size_t colon = why.find(':');
    co_await refuse(std::string_view(why).substr(0, colon), std::string_view(why).substr(colon + 1));
    co_return;
  }
  if (!route->metered) {
    co_await passThrough(call, out);
    co_return;
  }
  call.body = json::parse(req.body, nullptr, false);
  if (call.body.is_discarded()) {
    co_await refuse("bad_request", "the body is not valid JSON");
    co_return;
  }
  std::string wrong;
  try {
    call.facts = proxy::inspect(route->endpoint, call.body);
  } catch (const proxy::WireError& e) {
    wrong = e.field + " " + e.message;
  }
  if (!wrong.empty()) {
    co_await refuse("bad_request", wrong);
    co_return;
  }
  co_await metered(call, out);
}

net::awaitable<void> Proxy::passThrough(Call& call, http::Stream& out) {
  proxy::Headers headers = forwardHeaders(call.request, config_);
  std::optional<proxy::Exchange> ex;
  std::string body;
  std::optional<ErrorReply> failed;
  try {
    ex.emplace(co_await call.upstream->send(co_await net::this_coro::executor, call.request.method, call.rest,
                                            std::move(headers), call.request.body));
    body = co_await ex->readAll(static_cast<std::size_t>(config_.max_response_bytes));
  } catch (const proxy::UpstreamError& e) {
    failed = upstreamFailed(call, e);
  }
  if (failed) {
    co_await out.respond(failed->status, "application/json", failed->body);
    co_return;
  }
  call.m->requests[ex->status() / 100 == 2 ? proxy::Metrics::kOk : proxy::Metrics::kUpstreamStatus]->Increment();
  // (Not a ?: inside the co_await: GCC 12 destroys such a temporary twice, GCC bug 101367.)
  std::string type = ex->header("Content-Type");
  if (type.empty()) type = "application/json";
  co_await out.respond(ex->status(), type, body, replyHeaders(*ex));
}

net::awaitable<void> Proxy::metered(Call& call, http::Stream& out) {
  const UpstreamConfig& up = call.upstream->config();
  call.model = up.model_prefix + call.facts.model;
  call.chars_per_token = charsPerToken(call.facts.model);
  call.prompt_estimate = proxy::estimatePromptTokens(call.facts, call.chars_per_token, config_.image_tokens);
  const std::int64_t completion_hold = call.facts.max_completion.value_or(config_.default_max_tokens);
  call.completion_hold = completion_hold;

  tokenfuse::Call c{call.payer.tenant, call.model, call.payer.run, call.payer.agent, call.prompt_estimate,
                    completion_hold, 0};
  c.tags = call.payer.tags;
  CallSite site;
  Decision d = engine_.prepare(c, &site, true);
  const std::int64_t ttl_ms = std::max(kMinTtlMs, 2 * up.timeout_ms);
  if (d.allowed()) d = engine_.reserve(site, call.prompt_estimate, completion_hold, ttl_ms, &call.reservation);
  if (!d.allowed()) {
    const ErrorReply e = proxy::errorReply(call.family(), denialKind(d.code), d.errorCode(), describe(d, call.payer.tenant));
    std::vector<std::pair<std::string, std::string>> headers;
    if (const auto wait = retryAfterSeconds(d, header_)) headers.emplace_back("Retry-After", std::to_string(*wait));
    // SDKs retry 429s: a spending limit will not lift in a moment, so they are told not to.
    if (std::string_view(denialKind(d.code)) == "budget") headers.emplace_back("x-should-retry", "false");
    headers.emplace_back("X-Tokenfuse-Error", d.errorCode());
    call.m->requests[proxy::Metrics::kDenied]->Increment();
    co_await out.respond(e.status, "application/json", e.body, std::move(headers));
    co_return;
  }
  call.settled = false;
  // Whatever ends this call (an exception, the server stopping), a hold that was not booked is
  // returned, and the tokens a stream delivered are booked.
  struct Settle {
    Engine& engine;
    Call& call;
    ~Settle() {
      if (call.settled) return;
      if (call.charged_prompt > 0 || call.charged_completion > 0) {
        engine.commit(call.reservation, call.upstream->config().provider, call.charged_prompt, call.charged_completion);
      } else {
        engine.release(call.reservation);
      }
    }
  } settle{engine_, call};

  // An OpenAI stream reports its usage only when asked: ask, and keep the chunk from a client
  // that did not.
  const proxy::Endpoint ep = call.route.endpoint;
  if (call.facts.stream && (ep == proxy::Endpoint::kChatCompletions || ep == proxy::Endpoint::kCompletions)) {
    json& options = call.body["stream_options"];
    if (!options.is_object()) options = json::object();
    const auto include = options.find("include_usage");
    if (include == options.end() || !include->is_boolean() || !include->get<bool>()) {
      options["include_usage"] = true;
      call.added_usage = true;
    }
  }
  if (call.facts.stream) {
    co_await streamed(call, out);
  } else {
    co_await whole(call, out);
  }
}

// Counts an upstream failure before its answer and says it in the client's API shape.
ErrorReply Proxy::upstreamFailed(Call& call, const proxy::UpstreamError& e) {
  call.m->errors[static_cast<int>(e.kind())]->Increment();
  call.m->requests[proxy::Metrics::kUpstreamFailed]->Increment();
  return proxy::errorReply(call.family(), e.kind() == proxy::UpstreamError::Kind::kTimeout ? "timeout" : "upstream", {},
                           std::string(e.what()) + " (upstream " + call.upstream->config().name + ")");
}

namespace {

double seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

net::awaitable<void> Proxy::book(Call& call, std::int64_t prompt, std::int64_t completion, bool estimated) {
  Decision d;
  // A full ledger ring refuses for a moment while the agent catches up; the call happened, so
  // it is booked all the same, a few milliseconds later.
  net::steady_timer pause(co_await net::this_coro::executor);
  for (int attempt = 0; attempt < 400; ++attempt) {
    d = engine_.commit(call.reservation, call.upstream->config().provider, prompt, completion);
    if (d.code != Code::kLedgerFull && d.code != Code::kRegionBusy) break;
    pause.expires_after(std::chrono::milliseconds(5));
    co_await pause.async_wait(net::use_awaitable);
  }
  call.settled = true;
  if (!d.allowed()) {
    // The hold stays until the agent returns it at its deadline (so the limits still count it);
    // what the call cost is only in the log.
    call.settled = true;
    call.m->not_booked->Increment();
    log::error("proxy_not_booked", {{"upstream", call.upstream->config().name},
                                    {"tenant", call.payer.tenant},
                                    {"model", call.model},
                                    {"prompt_tokens", prompt},
                                    {"completion_tokens", completion},
                                    {"error", d.errorCode()}});
    co_return;
  }
  if (estimated) call.m->estimated->Increment();
  call.m->prompt_tokens->Increment(static_cast<double>(prompt));
  call.m->completion_tokens->Increment(static_cast<double>(completion));
  call.m->cost_usd->Increment(static_cast<double>(d.cost.count()) / 1e9);
}

net::awaitable<void> Proxy::whole(Call& call, http::Stream& out) {
  std::optional<proxy::Exchange> ex;
  std::string body;
  std::optional<ErrorReply> failed;
  try {
    ex.emplace(co_await call.upstream->send(co_await net::this_coro::executor, "POST", call.rest,
                                            forwardHeaders(call.request, config_), call.body.dump()));
    call.m->first_byte->Observe(seconds(call.started));
    body = co_await ex->readAll(static_cast<std::size_t>(config_.max_response_bytes));
  } catch (const proxy::UpstreamError& e) {
    failed = upstreamFailed(call, e);
  }
  co_await finishWhole(call, out, ex ? &*ex : nullptr, body, failed);
}

net::awaitable<void> Proxy::finishWhole(Call& call, http::Stream& out, proxy::Exchange* ex, const std::string& body,
                                        const std::optional<ErrorReply>& failed) {
  proxy::Metrics& m = *call.m;
  const bool answered = ex != nullptr && ex->status() / 100 == 2;
  if (failed) {
    if (answered) {
      // The upstream said yes and then broke off, went silent or sent too much: the call
      // happened, and what it cost is unknown, so the whole hold is booked.
      co_await book(call, call.prompt_estimate, call.completion_hold, true);
    } else {
      // Refused or silent before an answer: no call is known to have happened.
      engine_.release(call.reservation);
      call.settled = true;
    }
    co_await out.respond(failed->status, "application/json", failed->body);
    co_return;
  }
  std::string type = ex->header("Content-Type");
  if (type.empty()) type = "application/json";
  if (!answered) {
    // The upstream's own refusal, already in its API's shape: relayed; nothing was generated.
    engine_.release(call.reservation);
    call.settled = true;
    m.requests[proxy::Metrics::kUpstreamStatus]->Increment();
    co_await out.respond(ex->status(), type, body, replyHeaders(*ex));
    co_return;
  }
  if (encoded(*ex)) {
    // Compressed though the proxy asked for none: unreadable, so the hold is booked.
    co_await book(call, call.prompt_estimate, call.completion_hold, true);
  } else {
    const json r = json::parse(body, nullptr, false);
    const proxy::UsageFacts usage = r.is_discarded() ? proxy::UsageFacts{} : proxy::usageOf(call.route.endpoint, r);
    const std::optional<std::int64_t> text = r.is_discarded() ? std::nullopt : proxy::answerTextBytes(r);
    const std::int64_t completion =
        usage.completion ? *usage.completion
                         : proxy::estimateCompletionTokens(text.value_or(static_cast<std::int64_t>(body.size())), 0,
                                                           call.chars_per_token);
    co_await book(call, usage.prompt.value_or(call.prompt_estimate), completion, !(usage.prompt && usage.completion));
  }
  m.requests[proxy::Metrics::kOk]->Increment();
  co_await out.respond(ex->status(), type, body, replyHeaders(*ex));
  m.duration->Observe(seconds(call.started));
}

net::awaitable<void> Proxy::streamed(Call& call, http::Stream& out) {
  proxy::Metrics& m = *call.m;
  const proxy::Endpoint ep = call.route.endpoint;
  std::optional<proxy::Exchange> ex;
  std::optional<ErrorReply> failed;
  try {
    ex.emplace(co_await call.upstream->send(co_await net::this_coro::executor, "POST", call.rest,
                                            forwardHeaders(call.request, config_), call.body.dump()));
  } catch (const proxy::UpstreamError& e) {
    failed = upstreamFailed(call, e);
  }
  if (failed) {
    engine_.release(call.reservation);
    call.settled = true;
    co_await out.respond(failed->status, "application/json", failed->body);
    co_return;
  }
  m.first_byte->Observe(seconds(call.started));
  std::string type = ex->header("Content-Type");
  const bool is_stream = (contains(type, "event-stream") || contains(type, "ndjson")) && !encoded(*ex);
  if (ex->status() / 100 != 2 || !is_stream) {
    // An error (or an answer that is not a stream after all): whole, as whole() would.
    std::string body;
    std::optional<ErrorReply> broke;
    try {
      body = co_await ex->readAll(static_cast<std::size_t>(config_.max_response_bytes));
    } catch (const proxy::UpstreamError& e) {
      broke = upstreamFailed(call, e);
    }
    co_await finishWhole(call, out, &*ex, body, broke);
    co_return;
  }

  m.streams_open->Increment();
  struct Open {
    prometheus::Gauge& g;
    ~Open() { g.Decrement(); }
  } open{*m.streams_open};
  const auto format = proxy::streamFormat(ep);
  proxy::StreamSplitter splitter(format);
  std::int64_t& charged_prompt = call.charged_prompt;
  std::int64_t& charged_completion = call.charged_completion;
  std::int64_t text_bytes = 0, text_chunks = 0;
  std::optional<std::int64_t> reported_prompt, reported_completion;
  co_await out.begin(ex->status(), type, replyHeaders(*ex));   // sent with the first events
  bool client_gone = false;
  bool finished = false, upstream_error_event = false;
  std::optional<Decision> cut;
  std::string failure;   // why the upstream's stream broke off

  // Charges what the client is about to receive; false when it would cross a limit.
  auto charge = [&](std::int64_t prompt, std::int64_t completion) {
    prompt = std::max(prompt, charged_prompt);
    completion = std::max(completion, charged_completion);
    if (prompt == charged_prompt && completion == charged_completion) return true;
    const Decision d = engine_.charge(call.reservation, prompt - charged_prompt, completion - charged_completion);
    if (!d.allowed()) {
      cut = d;
      return false;
    }
    charged_prompt = prompt;
    charged_completion = completion;
    return true;
  };
  charge(call.prompt_estimate, 0);   // the prompt is spent once the upstream answers

  std::string chunk;
  while (!client_gone && !cut && failure.empty()) {
    chunk.clear();
    try {
      if (!co_await ex->read(&chunk)) break;
    } catch (const proxy::UpstreamError& e) {
      m.errors[static_cast<int>(e.kind())]->Increment();
      failure = e.what();
      break;
    }
    if (!splitter.feed(chunk)) {
      m.errors[static_cast<int>(proxy::UpstreamError::Kind::kProtocol)]->Increment();
      failure = "the upstream sent an event larger than 1 MiB";
      break;
    }
    std::string batch;   // the events of one read, passed on in one write
    while (std::optional<std::string> raw = splitter.next()) {
      const proxy::StreamEvent event = proxy::parseEvent(format, *raw);
      const proxy::EventFacts facts = proxy::interpret(ep, event);
      if (facts.usage.prompt) reported_prompt = facts.usage.prompt;
      if (facts.usage.completion) reported_completion = facts.usage.completion;
      upstream_error_event = upstream_error_event || facts.error;
      if (facts.carries_text) {
        text_bytes += facts.text_bytes;
        ++text_chunks;
        const std::int64_t completion =
            std::max(proxy::estimateCompletionTokens(text_bytes, text_chunks, call.chars_per_token),
                     reported_completion.value_or(0));
        if (!charge(reported_prompt.value_or(0), completion)) break;
      }
      finished = finished || facts.final;
      if (facts.usage_only && call.added_usage) continue;   // asked for by the proxy, not the client
      batch += *raw;
    }
    if (!batch.empty() && !co_await out.write(batch)) client_gone = true;
  }
  if (cut) {
    // The next chunk would have crossed a limit: the upstream is stopped (the connection closes
    // with the exchange) and the client's stream ends with an error in its API's shape.
    ex.reset();
    m.streams_cut->Increment();
    m.requests[proxy::Metrics::kCut]->Increment();
    const ErrorReply e = proxy::errorReply(call.family(), denialKind(cut->code), cut->errorCode(),
                                           describe(*cut, call.payer.tenant) + " (the stream was cut here)");
    co_await out.write(e.stream_event);
  } else if (client_gone) {
    ex.reset();
    m.requests[proxy::Metrics::kClientGone]->Increment();
  } else if (!failure.empty() || (!finished && !upstream_error_event)) {
    if (failure.empty()) failure = "the upstream's stream ended before its last event";
    ex.reset();
    m.requests[proxy::Metrics::kUpstreamFailed]->Increment();
    const ErrorReply e = proxy::errorReply(call.family(), "upstream", {},
                                           failure + " (upstream " + call.upstream->config().name + ")");
    co_await out.write(e.stream_event);
  } else {
    m.requests[upstream_error_event ? proxy::Metrics::kUpstreamFailed : proxy::Metrics::kOk]->Increment();
  }
  // A finished stream books the usage it reported; one that ended early books what was delivered.
  const bool exact = finished && !cut && !client_gone && reported_prompt && reported_completion;
  if (exact) {
    co_await book(call, *reported_prompt, *reported_completion, false);
  } else {
    co_await book(call, charged_prompt, charged_completion, finished && !cut && !client_gone);
  }
  m.duration->Observe(seconds(call.started));
}

}  // namespace tokenfuse
