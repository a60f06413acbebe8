// Block records <-> Python lists ([stored, raw, crc, mode] plus
// [kinds, [plane lengths]] for byte planes), for the CPython binding.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string>

#include "codec.h"

namespace shardckpt {

// A new list, or nullptr with a Python error set.
PyObject* record_to_list(const BlockRecord& r);

// Parses and validates one record; on failure sets *why and returns false
// without a Python error set (the caller names the block).
bool parse_record(PyObject* obj, BlockRecord* r, std::string* why);

}  // namespace shardckpt
