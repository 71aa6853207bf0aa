// What an id may contain: project_id, run_id, agent_id, model and provider end up in SQLite,
// JSON (the HTTP API, alerts, the CLI) and Postgres, which all take text. So an id is valid
// UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF) without NUL (C strings and
// Postgres text stop there). Checked where an id enters: the library's prepare, record and
// commit, the admin paths and the HTTP API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tokenfuse {

// The length of the UTF-8 sequence at s[i] (1 to 4), or 0 if none starts there or it is NUL.
constexpr std::size_t idSequenceLength(std::string_view s, std::size_t i) noexcept {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b >= 0x01 && b < 0x80) return 1;   // ASCII, the common case
  std::size_t len = 0;
  std::uint32_t cp = 0;
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2, cp = b & 0x1Fu;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3, cp = b & 0x0Fu;
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4, cp = b & 0x07u;
  } else {
    return 0;   // NUL, a continuation byte first, C0/C1 (overlong) or F5..FF
  }
  if (s.size() - i < len) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if ((c & 0xC0u) != 0x80u) return 0;
    cp = (cp << 6) | (c & 0x3Fu);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;   // overlong, past Unicode, or a UTF-16 surrogate
  }
  return len;
}

// True if `s` is valid UTF-8 without a NUL byte. Allocates nothing; one pass.
constexpr bool validIdText(std::string_view s) noexcept {
  for (std::size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) - 1u < 0x7Fu) {   // ASCII without NUL, inline
      ++i;
      continue;
    }
    const std::size_t len = idSequenceLength(s, i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

// `s` with every byte that is not part of valid UTF-8 (and every NUL) replaced by U+FFFD, for
// outputs that must take text (Prometheus labels) and meet an id stored before it was checked.
inline std::string displayId(std::string_view s) {
  if (validIdText(s)) return std::string(s);
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t len = idSequenceLength(s, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s, i, len);
      i += len;
    }
  }
  return out;
}

}  // namespace tokenfuse
