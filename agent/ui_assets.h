// The dashboard's files (agent/ui), compiled into tokenfused by agent/ui/embed.cmake: /ui works on
// an air-gapped host with nothing installed beside the binary.
#pragma once

#include <array>
#include <string_view>

namespace tokenfuse::ui {

struct Asset {
  std::string_view path;           // "/ui", "/ui/app.js", "/ui/app.css"
  std::string_view content_type;
  std::string_view body;
};

extern const std::array<Asset, 3> kAssets;

}  // namespace tokenfuse::ui
