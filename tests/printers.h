// How doctest shows tokenfuse values in a failed assertion.
#pragma once

#include <tokenfuse/tokenfuse.hpp>

#include <doctest/doctest.h>

namespace doctest {
template <>
struct StringMaker<tokenfuse::NanoUsd> {
  static String convert(tokenfuse::NanoUsd v) { return ("$" + v.toString()).c_str(); }
};
template <>
struct StringMaker<tokenfuse::Price> {
  static String convert(tokenfuse::Price p) {
    return ("{" + std::to_string(p.prompt_nano_per_mtok) + ", " + std::to_string(p.completion_nano_per_mtok) + "}").c_str();
  }
};
template <>
struct StringMaker<tokenfuse::Code> {
  static String convert(tokenfuse::Code c) { return tokenfuse::errorCode(c); }
};
}  // namespace doctest
