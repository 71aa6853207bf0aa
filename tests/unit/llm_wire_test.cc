// What the proxy reads from each LLM API's wire format (agent/llm_wire.h), on the providers'
// published examples.
#include "llm_wire.h"

#include <doctest/doctest.h>

using namespace tokenfuse::proxy;
using nlohmann::json;

TEST_CASE("llm wire: routes by upstream kind, an Ollama upstream also speaks OpenAI's /v1") {
  CHECK(route("openai", "POST", "/v1/chat/completions")->endpoint == Endpoint::kChatCompletions);
  CHECK(route("openai", "POST", "/v1/responses")->endpoint == Endpoint::kResponses);
  CHECK(!route("openai", "POST", "/v1/messages"));
  CHECK(!route("openai", "DELETE", "/v1/chat/completions"));
  CHECK(route("openai", "GET", "/v1/models/gpt-4o")->metered == false);
  CHECK(route("anthropic", "POST", "/v1/messages")->family == Family::kAnthropic);
  CHECK(!route("anthropic", "POST", "/v1/chat/completions"));
  CHECK(route("ollama", "POST", "/api/chat")->family == Family::kOllama);
  CHECK(route("ollama", "POST", "/v1/chat/completions")->family == Family::kOpenAi);
  CHECK(route("ollama", "GET", "/api/tags")->metered == false);
  CHECK(!route("ollama", "POST", "/api/pull"));   // not a call that costs tokens, not served
}

TEST_CASE("llm wire: a request's model, stream flag and completion limit, per API") {
  const json chat = json::parse(R"({"model":"gpt-4o","n":2,"max_completion_tokens":100,"max_tokens":7,"stream":true,
    "messages":[{"role":"system","content":"You are terse."},{"role":"user","content":[{"type":"text","text":"Hi!"},
    {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]})");
  RequestFacts f = inspect(Endpoint::kChatCompletions, chat);
  CHECK(f.model == "gpt-4o");
  CHECK(f.stream);
  CHECK(f.max_completion == 200);   // max_completion_tokens wins over max_tokens, times n
  CHECK(f.parts == 2);
  CHECK(f.images == 1);
  CHECK(f.text_bytes == 14 + 3);    // "You are terse." and "Hi!"; roles and types are not prompt text
  CHECK(estimatePromptTokens(f, 4.0, 1000) == 5 + 2 * 4 + 1000);

  CHECK(!inspect(Endpoint::kChatCompletions, json{{"model", "m"}, {"messages", json::array()}}).max_completion);
  CHECK(inspect(Endpoint::kMessages, json{{"model", "claude"}, {"max_tokens", 1024}, {"system", "s"}}).max_completion == 1024);
  CHECK(inspect(Endpoint::kResponses, json{{"model", "m"}, {"input", "x"}, {"max_output_tokens", 5}}).max_completion == 5);
  CHECK(inspect(Endpoint::kEmbeddings, json{{"model", "m"}, {"input", {"a", "b"}}}).max_completion == 0);
  // Ollama streams unless told not to; num_predict -1 is "no limit".
  const RequestFacts o = inspect(Endpoint::kOllamaChat, json{{"model", "llama3.2"}, {"options", {{"num_predict", -1}}}});
  CHECK(o.stream);
  CHECK(!o.max_completion);
  CHECK(inspect(Endpoint::kOllamaGenerate, json{{"model", "llama3.2"}, {"stream", false}, {"options", {{"num_predict", 64}}}})
            .max_completion == 64);
  CHECK(inspect(Endpoint::kOllamaChat, json{{"model", "l"}, {"images", {"iVBORw0KGgo"}}}).images == 1);
}

TEST_CASE("llm wire: a request that cannot be forwarded names its field") {
  auto why = [](const json& body) {
    try {
      inspect(Endpoint::kChatCompletions, body);
    } catch (const WireError& e) {
      return e.field + " " + e.message;
    }
    return std::string();
  };
  CHECK(why(json::array()) == "body must be a JSON object");
  CHECK(why(json{{"messages", json::array()}}) == "model is required (a non-empty string)");
  CHECK(why(json{{"model", 5}}) == "model is required (a non-empty string)");
  CHECK(why(json{{"model", std::string(129, 'm')}}) == "model may be at most 128 bytes");
  CHECK(why(json{{"model", "m"}, {"stream", "yes"}}) == "stream must be true or false");
  CHECK(why(json{{"model", "m"}, {"max_tokens", 1.5}}) == "max_tokens must be a whole number");
  json deep = "x";
  for (int i = 0; i < 200; ++i) deep = json::array({deep});
  CHECK(why(json{{"model", "m"}, {"messages", deep}}) == "body is nested more than 128 deep");
}

TEST_CASE("llm wire: usage as each API reports it") {
  const auto openai = usageOf(Endpoint::kChatCompletions, json::parse(
      R"({"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}})"));
  CHECK(openai.prompt == 19);
  CHECK(openai.completion == 10);
  CHECK(openai.model == "gpt-4o-2024-08-06");
  const auto claude = usageOf(Endpoint::kMessages, json::parse(
      R"({"usage":{"input_tokens":2095,"output_tokens":503,"cache_creation_input_tokens":10,"cache_read_input_tokens":5}})"));
  CHECK(claude.prompt == 2110);
  CHECK(claude.completion == 503);
  const auto llama = usageOf(Endpoint::kOllamaGenerate, json::parse(R"({"prompt_eval_count":26,"eval_count":290,"done":true})"));
  CHECK(llama.prompt == 26);
  CHECK(llama.completion == 290);
  CHECK(usageOf(Endpoint::kResponses, json::parse(R"({"usage":{"input_tokens":36,"output_tokens":87}})")).completion == 87);
  CHECK(usageOf(Endpoint::kEmbeddings, json::parse(R"({"usage":{"prompt_tokens":8,"total_tokens":8}})")).completion == 0);
  // Counts that are not counts are not believed.
  const auto bad = usageOf(Endpoint::kChatCompletions, json::parse(R"({"usage":{"prompt_tokens":-1,"completion_tokens":"9"}})"));
  CHECK(!bad.prompt);
  CHECK(!bad.completion);
  CHECK(!usageOf(Endpoint::kChatCompletions, json::parse(R"({"usage":{"prompt_tokens":1e30}})")).prompt);
}

TEST_CASE("llm wire: the splitter hands out whole SSE events and NDJSON lines however the bytes arrive") {
  StreamSplitter sse(StreamSplitter::Format::kSse);
  const std::string text = "event: message_start\ndata: {\"a\":1}\n\n: comment\r\ndata: [DONE]\r\n\r\ndata: {\"b\"";
  for (char c : text) CHECK(sse.feed(std::string_view(&c, 1)));
  const auto first = sse.next();
  REQUIRE(first);
  CHECK(*first == "event: message_start\ndata: {\"a\":1}\n\n");
  const StreamEvent e = parseEvent(StreamSplitter::Format::kSse, *first);
  CHECK(e.name == "message_start");
  CHECK(e.data == "{\"a\":1}");
  const auto second = sse.next();
  REQUIRE(second);
  CHECK(parseEvent(StreamSplitter::Format::kSse, *second).done_marker);
  CHECK(!sse.next());
  CHECK(sse.pending() == 10);   // data: {"b"
  CHECK(parseEvent(StreamSplitter::Format::kSse, "data: a\ndata: b\n\n").data == "a\nb");

  StreamSplitter nd(StreamSplitter::Format::kNdjson);
  nd.feed("{\"x\":1}\n{\"y\"");
  CHECK(nd.next() == "{\"x\":1}\n");
  CHECK(!nd.next());
  nd.feed(":2}\n");
  CHECK(parseEvent(StreamSplitter::Format::kNdjson, *nd.next()).data == "{\"y\":2}");

  StreamSplitter small(StreamSplitter::Format::kSse, 16);
  CHECK(!small.feed(std::string(17, 'x')));   // an event without end beyond the limit: malformed
}

TEST_CASE("llm wire: stream events: text, usage, the end, and errors, per API") {
  auto ev = [](Endpoint ep, const char* name, const char* data) { return interpret(ep, StreamEvent{name, data, false}); };
  const auto chunk = ev(Endpoint::kChatCompletions, "",
                        R"({"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}],"model":"gpt-4o"})");
  CHECK(chunk.carries_text);
  CHECK(chunk.text_bytes == 5);
  const auto tool = ev(Endpoint::kChatCompletions, "",
                       R"({"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\""}}]}}]})");
  CHECK(tool.text_bytes == 4);
  const auto usage = ev(Endpoint::kChatCompletions, "", R"({"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12}})");
  CHECK(usage.usage_only);
  CHECK(usage.usage.completion == 12);
  CHECK(!ev(Endpoint::kChatCompletions, "", R"({"choices":[{"delta":{}}],"usage":null})").usage_only);
  CHECK(ev(Endpoint::kChatCompletions, "", R"({"error":{"message":"overloaded"}})").error);
  CHECK(interpret(Endpoint::kChatCompletions, StreamEvent{"", "[DONE]", true}).final);
  CHECK(ev(Endpoint::kChatCompletions, "", R"({"choices":[{"delta":{},"finish_reason":"stop"}]})").final);   // no [DONE] needed
  CHECK(!ev(Endpoint::kChatCompletions, "", R"({"choices":[{"delta":{"content":"a"},"finish_reason":null}]})").final);
  CHECK(ev(Endpoint::kChatCompletions, "", "not json").error);

  const auto start = ev(Endpoint::kMessages, "message_start",
                        R"({"type":"message_start","message":{"model":"claude","usage":{"input_tokens":25,"output_tokens":1}}})");
  CHECK(start.usage.prompt == 25);
  CHECK(!start.usage.completion);
  CHECK(ev(Endpoint::kMessages, "content_block_delta",
           R"({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}})").text_bytes == 2);
  CHECK(ev(Endpoint::kMessages, "message_delta", R"({"type":"message_delta","usage":{"output_tokens":15}})").usage.completion == 15);
  CHECK(ev(Endpoint::kMessages, "message_stop", R"({"type":"message_stop"})").final);
  CHECK(ev(Endpoint::kMessages, "error", R"({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})").error);

  const auto piece = ev(Endpoint::kOllamaChat, "", R"({"model":"llama3.2","message":{"role":"assistant","content":"The"},"done":false})");
  CHECK(piece.text_bytes == 3);
  CHECK(!piece.final);
  const auto last = ev(Endpoint::kOllamaGenerate, "", R"({"response":"","done":true,"prompt_eval_count":26,"eval_count":290})");
  CHECK(last.final);
  CHECK(last.usage.completion == 290);
  CHECK(ev(Endpoint::kOllamaChat, "", R"({"error":"model not found"})").error);

  CHECK(ev(Endpoint::kResponses, "response.output_text.delta", R"({"type":"response.output_text.delta","delta":"Hi"})").text_bytes == 2);
  const auto done = ev(Endpoint::kResponses, "response.completed",
                       R"({"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4}}})");
  CHECK(done.final);
  CHECK(done.usage.completion == 4);
}

TEST_CASE("llm wire: estimates") {
  CHECK(estimateCompletionTokens(0, 0, 4.0) == 0);
  CHECK(estimateCompletionTokens(9, 1, 4.0) == 3);   // by text, rounded up
  CHECK(estimateCompletionTokens(4, 3, 4.0) == 3);   // never fewer than the chunks that carried text
  CHECK(answerTextBytes(json::parse(R"({"id":"x","model":"m","choices":[{"message":{"role":"assistant","content":"abcd"}}]})")) == 4);
}

TEST_CASE("llm wire: errors in each API's shape, with the code and the status its SDK expects") {
  const ErrorReply openai = errorReply(Family::kOpenAi, "budget", "E-BUDGET-002", "Tenant acme budget exhausted");
  CHECK(openai.status == 429);
  CHECK(json::parse(openai.body) == json{{"error", {{"message", "E-BUDGET-002: Tenant acme budget exhausted"},
                                                    {"type", "insufficient_quota"}, {"param", nullptr}, {"code", "E-BUDGET-002"}}}});
  CHECK(openai.stream_event == "data: " + openai.body + "\n\n");
  const ErrorReply claude = errorReply(Family::kAnthropic, "budget", "E-BUDGET-003", "Platform budget exhausted");
  CHECK(claude.status == 402);
  CHECK(json::parse(claude.body)["error"]["type"] == "billing_error");
  CHECK(claude.stream_event.starts_with("event: error\ndata: {"));
  CHECK(errorReply(Family::kAnthropic, "rate", "E-RATE-001", "x").status == 429);
  CHECK(json::parse(errorReply(Family::kAnthropic, "rate", "E-RATE-001", "x").body)["error"]["type"] == "rate_limit_error");
  const ErrorReply llama = errorReply(Family::kOllama, "budget", "E-BUDGET-004", "Emergency kill switch activated");
  CHECK(llama.status == 429);
  CHECK(json::parse(llama.body)["error"] == "E-BUDGET-004: Emergency kill switch activated");
  CHECK(llama.stream_event == llama.body + "\n");
  CHECK(errorReply(Family::kOpenAi, "timeout", {}, "slow").status == 504);
  CHECK(errorReply(Family::kAnthropic, "auth", {}, "no key").status == 401);
}

TEST_CASE("llm wire: review findings: no path beside /v1/models, no fractional n, no background responses, deep "
          "answers, and every generated field charged") {
  CHECK(!route("openai", "GET", "/v1/models/../files"));
  CHECK(!route("openai", "GET", "/v1/models/%2e%2e"));
  CHECK(!route("anthropic", "GET", "/v1/models/a/b"));
  CHECK(route("ollama", "GET", "/v1/models/llama3.2:latest"));
  auto why = [](Endpoint ep, const json& body) {
    try {
      inspect(ep, body);
    } catch (const WireError& e) {
      return e.field + " " + e.message;
    }
    return std::string();
  };
  CHECK(why(Endpoint::kChatCompletions, json{{"model", "m"}, {"n", "8"}}) == "n must be a whole number from 1 to 128");
  CHECK(why(Endpoint::kChatCompletions, json{{"model", "m"}, {"n", 8.0}}) == "n must be a whole number from 1 to 128");
  CHECK(why(Endpoint::kCompletions, json{{"model", "m"}, {"best_of", 1000}}) == "best_of must be a whole number from 1 to 128");
  CHECK(why(Endpoint::kResponses, json{{"model", "m"}, {"background", true}}).starts_with("background is not supported"));
  CHECK(why(Endpoint::kResponses, json{{"model", "m"}, {"background", false}}).empty());
  json answer = json::object();
  json* at = &answer["choices"];
  for (int i = 0; i < 1000; ++i) at = &(*at)[0];   // built in place: a copy per level would be quadratic
  *at = "x";
  CHECK(!answerTextBytes(answer));   // walked no deeper than 128, and never dumped
  // An audio transcript and a legacy function call are generated text too.
  const auto audio = interpret(Endpoint::kChatCompletions,
                               StreamEvent{"", R"({"choices":[{"delta":{"audio":{"id":"a1","transcript":"Hello"}}}]})", false});
  CHECK(audio.carries_text);
  CHECK(audio.text_bytes == 5);
  const auto legacy = interpret(Endpoint::kChatCompletions,
                                StreamEvent{"", R"({"choices":[{"delta":{"function_call":{"name":"f","arguments":"{}"}}}]})", false});
  CHECK(legacy.text_bytes == 2);
  const auto role = interpret(Endpoint::kChatCompletions, StreamEvent{"", R"({"choices":[{"delta":{"role":"assistant","content":""}}]})", false});
  CHECK(!role.carries_text);
  const auto start = interpret(Endpoint::kMessages, StreamEvent{"content_block_start",
      R"({"type":"content_block_start","index":0,"content_block":{"type":"text","text":"Hi there"}})", false});
  CHECK(start.text_bytes == 8);
}
