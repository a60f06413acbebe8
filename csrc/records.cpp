#include "records.h"

namespace shardckpt {
namespace {

// A record length or checksum: a Python int in [0, 2**64). Anything else
// (negative, too large, float, str, list, None) is refused without raising.
bool parse_size(PyObject* obj, size_t* out) {
  // bool is an int subclass in Python; the format (and the Python twin) reject it.
  if (!PyLong_Check(obj) || PyBool_Check(obj)) return false;
  *out = PyLong_AsSize_t(obj);
  if (*out == static_cast<size_t>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

}  // namespace

// Builds the record exactly as py_encode_block does: [stored, raw, crc, mode]
// plus [kinds, [plane lengths]] for grouped blocks.
PyObject* record_to_list(const BlockRecord& r) {
  const bool grouped = r.mode == kModeGrouped;
  PyObject* list = PyList_New(grouped ? 6 : 4);
  if (list == nullptr) return nullptr;
  PyObject* items[4] = {PyLong_FromSize_t(r.stored_len), PyLong_FromSize_t(r.raw_len),
                        PyLong_FromUnsignedLong(r.crc), PyUnicode_FromStringAndSize(&r.mode, 1)};
  for (int i = 0; i < 4; ++i) {
    if (items[i] == nullptr) {
      for (int j = i + 1; j < 4; ++j) Py_XDECREF(items[j]);
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, items[i]);
  }
  if (grouped) {
    PyObject* kinds = PyUnicode_FromStringAndSize(r.kinds, r.group);
    if (kinds == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, 4, kinds);
    PyObject* lens = PyList_New(r.group);
    if (lens == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, 5, lens);
    for (int k = 0; k < r.group; ++k) {
      PyObject* v = PyLong_FromSize_t(r.lens[k]);
      if (v == nullptr) {
        Py_DECREF(list);
        return nullptr;
      }
      PyList_SET_ITEM(lens, k, v);
    }
  }
  return list;
}

bool parse_record(PyObject* obj, BlockRecord* r, std::string* why) {
  PyObject* seq = PySequence_Fast(obj, "");
  if (seq == nullptr) {
    PyErr_Clear();
    *why = "record is not a list";
    return false;
  }
  bool ok = false;
  const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
  PyObject** it = PySequence_Fast_ITEMS(seq);
  size_t crc = 0;
  const char* mode = nullptr;
  Py_ssize_t mode_len = 0;
  do {
    if (len < 4 || !parse_size(it[0], &r->stored_len) || !parse_size(it[1], &r->raw_len) ||
        !parse_size(it[2], &crc) || crc > 0xFFFFFFFFu || !PyUnicode_Check(it[3])) {
      *why = "malformed block record";
      break;
    }
    r->crc = static_cast<uint32_t>(crc);
    mode = PyUnicode_AsUTF8AndSize(it[3], &mode_len);
    if (mode == nullptr || mode_len != 1) {
      PyErr_Clear();
      *why = "malformed block mode";
      break;
    }
    r->mode = mode[0];
    // Exactly the fields the format defines: 4, or 6 for byte planes.
    if (len != (r->mode == kModeGrouped ? 6 : 4)) {
      *why = "malformed block record (wrong number of fields)";
      break;
    }
    if (r->mode == kModeGrouped) {
      if (len < 6 || !PyUnicode_Check(it[4]) || !(PyList_Check(it[5]) || PyTuple_Check(it[5]))) {
        *why = "malformed grouped block record";
        break;
      }
      Py_ssize_t nk = 0;
      const char* kinds = PyUnicode_AsUTF8AndSize(it[4], &nk);
      // Kinds are ASCII letters: a non-ASCII string's UTF-8 bytes would be
      // counted as planes.
      bool ascii = kinds != nullptr;
      for (Py_ssize_t k = 0; ascii && k < nk; ++k) {
        ascii = static_cast<unsigned char>(kinds[k]) < 0x80;
      }
      if (!ascii) {
        PyErr_Clear();
        *why = "malformed plane kinds";
        break;
      }
      // One length per plane: a list longer or shorter than the kinds string
      // is a damaged record, not something to index past.
      if (kinds == nullptr || nk < 2 || nk > kMaxGroup ||
          PySequence_Fast_GET_SIZE(it[5]) != nk) {
        PyErr_Clear();
        *why = "malformed plane list";
        break;
      }
      r->group = static_cast<int>(nk);
      bool lens_ok = true;
      for (Py_ssize_t k = 0; k < nk; ++k) {
        r->kinds[k] = kinds[k];
        lens_ok = lens_ok && parse_size(PySequence_Fast_GET_ITEM(it[5], k), &r->lens[k]);
      }
      if (!lens_ok) {
        *why = "malformed plane lengths";
        break;
      }
    }
    try {
      validate_record(*r);
    } catch (const CodecError& e) {
      *why = e.what();
      break;
    }
    ok = true;
  } while (false);
  Py_DECREF(seq);
  return ok;
}

}  // namespace shardckpt
