// shardckpt._native: the CPython binding of the block codec.
//
// Plain C API on purpose: no pybind11 and no libtorch, so the extension builds
// with nothing but a C++17 compiler and zlib, inside or outside pip's build
// isolation. Inputs and outputs are buffer-protocol objects; all heavy work
// runs with the GIL released.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>
#include <string>
#include <vector>

#include "codec.h"
#include "thread_pool.h"

namespace {

using shardckpt::BlockRecord;
using shardckpt::CodecError;

constexpr const char* kVersion = "0.1.0";

// Releases a Py_buffer on every exit path.
struct Buffer {
  Py_buffer view{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(view.buf); }
  uint8_t* mutable_data() { return static_cast<uint8_t*>(view.buf); }
  size_t size() const { return static_cast<size_t>(view.len); }
};

bool get_buffer(PyObject* obj, Buffer* buf, bool writable) {
  const int flags = writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS;
  if (PyObject_GetBuffer(obj, &buf->view, flags) != 0) return false;
  buf->held = true;
  return true;
}

// Builds the record exactly as py_encode_block does: [stored, raw, crc, mode]
// plus [kinds, [plane lengths]] for grouped blocks.
PyObject* record_to_list(const BlockRecord& r) {
  const bool grouped = r.mode == shardckpt::kModeGrouped;
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

// Parses and validates one record; on failure sets *why and returns false
// without a Python error set (the caller names the block).
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
    if (len != (r->mode == shardckpt::kModeGrouped ? 6 : 4)) {
      *why = "malformed block record (wrong number of fields)";
      break;
    }
    if (r->mode == shardckpt::kModeGrouped) {
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
      if (kinds == nullptr || nk < 2 || nk > shardckpt::kMaxGroup ||
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
      shardckpt::validate_record(*r);
    } catch (const CodecError& e) {
      *why = e.what();
      break;
    }
    ok = true;
  } while (false);
  Py_DECREF(seq);
  return ok;
}

// ValueError carrying .block_index and .reason, so shardckpt.codec can turn it
// into a CorruptCheckpointError that names the file, rank and tensor.
PyObject* block_error(Py_ssize_t index, const char* reason, const std::string& detail) {
  std::string msg = "block " + std::to_string(index) + ": " + detail;
  PyObject* exc = PyObject_CallFunction(PyExc_ValueError, "s", msg.c_str());
  if (exc == nullptr) return nullptr;
  PyObject* idx = PyLong_FromSsize_t(index);
  PyObject* why = PyUnicode_FromString(reason);
  if (idx && why) {
    PyObject_SetAttrString(exc, "block_index", idx);
    PyObject_SetAttrString(exc, "reason", why);
  }
  Py_XDECREF(idx);
  Py_XDECREF(why);
  PyErr_SetObject(PyExc_ValueError, exc);
  Py_DECREF(exc);
  return nullptr;
}

constexpr size_t kSaturated = static_cast<size_t>(-1);

// a + b, or kSaturated if that does not fit in a size_t.
size_t sat_add(size_t a, size_t b) { return b > kSaturated - a ? kSaturated : a + b; }

bool check_group(int group) {
  if (group < 1 || group > shardckpt::kMaxGroup) {
    PyErr_Format(PyExc_ValueError, "group must be in 1..%d, not %d", shardckpt::kMaxGroup, group);
    return false;
  }
  return true;
}

// ---------------------------------------------------------------- functions

PyObject* py_encode_block(PyObject*, PyObject* args) {
  PyObject* raw_obj;
  int group, compress, level;
  Py_ssize_t sample;
  if (!PyArg_ParseTuple(args, "Oipin:encode_block", &raw_obj, &group, &compress, &level, &sample))
    return nullptr;
  if (!check_group(group)) return nullptr;
  if (sample < 0) return PyErr_Format(PyExc_ValueError, "sample_size must be >= 0");
  Buffer raw;
  if (!get_buffer(raw_obj, &raw, false)) return nullptr;
  // Stored bytes never exceed the raw size, so the result object is
  // allocated once and encoded into directly, then shrunk.
  PyObject* out = PyBytes_FromStringAndSize(nullptr, raw.view.len);
  if (out == nullptr) return nullptr;
  BlockRecord rec;
  std::string err;
  Py_BEGIN_ALLOW_THREADS
  try {
    rec = shardckpt::encode_block(raw.data(), raw.size(), group, compress != 0, level,
                                  static_cast<size_t>(sample),
                                  reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out)));
  } catch (const std::exception& e) {
    err = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!err.empty()) {
    Py_DECREF(out);
    PyErr_SetString(PyExc_ValueError, err.c_str());
    return nullptr;
  }
  if (_PyBytes_Resize(&out, static_cast<Py_ssize_t>(rec.stored_len)) != 0) return nullptr;
  PyObject* lst = record_to_list(rec);
  if (lst == nullptr) {
    Py_DECREF(out);
    return nullptr;
  }
  PyObject* result = PyTuple_Pack(2, out, lst);
  Py_DECREF(out);
  Py_DECREF(lst);
  return result;
}

PyObject* py_decode_block(PyObject*, PyObject* args) {
  PyObject *stored_obj, *rec_obj, *out_obj;
  if (!PyArg_ParseTuple(args, "OOO:decode_block", &stored_obj, &rec_obj, &out_obj)) return nullptr;
  BlockRecord rec;
  std::string why;
  if (!parse_record(rec_obj, &rec, &why)) {
    PyErr_SetString(PyExc_ValueError, why.c_str());
    return nullptr;
  }
  Buffer stored, out;
  if (!get_buffer(stored_obj, &stored, false) || !get_buffer(out_obj, &out, true)) return nullptr;
  if (stored.size() != rec.stored_len) {
    return PyErr_Format(PyExc_ValueError, "stored block is %zd bytes, record says %zu",
                        stored.view.len, rec.stored_len);
  }
  if (out.size() != rec.raw_len) {
    return PyErr_Format(PyExc_ValueError, "output buffer is %zd bytes, block holds %zu",
                        out.view.len, rec.raw_len);
  }
  std::string err;
  Py_BEGIN_ALLOW_THREADS
  try {
    shardckpt::decode_block(stored.data(), stored.size(), rec, out.mutable_data(), out.size());
  } catch (const std::exception& e) {
    err = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!err.empty()) {
    PyErr_SetString(PyExc_ValueError, err.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_encode_blocks(PyObject*, PyObject* args) {
  PyObject* raw_obj;
  int group, compress, level, threads;
  Py_ssize_t block_size, sample;
  if (!PyArg_ParseTuple(args, "Oipinni:encode_blocks", &raw_obj, &group, &compress, &level,
                        &block_size, &sample, &threads))
    return nullptr;
  if (!check_group(group)) return nullptr;
  if (block_size <= 0 || sample < 0)
    return PyErr_Format(PyExc_ValueError, "block_size must be > 0 and sample_size >= 0");
  Buffer raw;
  if (!get_buffer(raw_obj, &raw, false)) return nullptr;
  const size_t n = raw.size();
  const size_t bs = static_cast<size_t>(block_size);
  const size_t nblocks = (n + bs - 1) / bs;

  // Result bytes objects are created up front (this needs the GIL) and the
  // workers encode straight into them.
  std::vector<PyObject*> outs(nblocks, nullptr);
  std::vector<uint8_t*> dsts(nblocks, nullptr);
  auto release_outs = [&] {
    for (PyObject* o : outs) Py_XDECREF(o);
  };
  for (size_t i = 0; i < nblocks; ++i) {
    const size_t len = std::min(bs, n - i * bs);
    outs[i] = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(len));
    if (outs[i] == nullptr) {
      release_outs();
      return nullptr;
    }
    dsts[i] = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(outs[i]));
  }
  std::vector<BlockRecord> recs(nblocks);
  std::vector<std::string> errs(nblocks);
  const uint8_t* src = raw.data();
  std::string pool_err;
  Py_BEGIN_ALLOW_THREADS
  try {
    shardckpt::ThreadPool::instance().parallel_for(nblocks, threads, [&](size_t i) {
      const size_t len = std::min(bs, n - i * bs);
      try {
        recs[i] = shardckpt::encode_block(src + i * bs, len, group, compress != 0, level,
                                          static_cast<size_t>(sample), dsts[i]);
      } catch (const std::exception& e) {
        errs[i] = e.what();
      }
    });
  } catch (const std::exception& e) {
    pool_err = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!pool_err.empty()) {
    release_outs();
    PyErr_SetString(PyExc_RuntimeError, pool_err.c_str());
    return nullptr;
  }
  for (size_t i = 0; i < nblocks; ++i) {
    if (!errs[i].empty()) {
      release_outs();
      return block_error(static_cast<Py_ssize_t>(i), "encode", errs[i]);
    }
  }
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(nblocks));
  if (result == nullptr) {
    release_outs();
    return nullptr;
  }
  for (size_t i = 0; i < nblocks; ++i) {
    PyObject* out = outs[i];
    outs[i] = nullptr;  // owned by the tuple (or freed) from here on
    PyObject* lst = nullptr;
    PyObject* pair = nullptr;
    if (_PyBytes_Resize(&out, static_cast<Py_ssize_t>(recs[i].stored_len)) == 0 &&
        (lst = record_to_list(recs[i])) != nullptr) {
      pair = PyTuple_Pack(2, out, lst);
    }
    Py_XDECREF(out);
    Py_XDECREF(lst);
    if (pair == nullptr) {
      release_outs();
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(i), pair);
  }
  return result;
}

PyObject* py_decode_blocks(PyObject*, PyObject* args) {
  PyObject *stored_obj, *recs_obj, *out_obj;
  int threads, verify;
  if (!PyArg_ParseTuple(args, "OOOip:decode_blocks", &stored_obj, &recs_obj, &out_obj, &threads,
                        &verify))
    return nullptr;
  PyObject* seq = PySequence_Fast(recs_obj, "recs must be a list of block records");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t nblocks = PySequence_Fast_GET_SIZE(seq);
  std::vector<BlockRecord> recs(static_cast<size_t>(nblocks));
  std::vector<size_t> stored_off(static_cast<size_t>(nblocks) + 1, 0);
  std::vector<size_t> raw_off(static_cast<size_t>(nblocks) + 1, 0);
  for (Py_ssize_t i = 0; i < nblocks; ++i) {
    std::string why;
    if (!parse_record(PySequence_Fast_GET_ITEM(seq, i), &recs[i], &why)) {
      Py_DECREF(seq);
      return block_error(i, "record", why);
    }
    // Offsets saturate instead of wrapping: a length near 2**64 must not
    // bring a later block's offset back inside the buffers. A saturated
    // offset is past the end of any buffer, so the checks below refuse it.
    stored_off[i + 1] = sat_add(stored_off[i], recs[i].stored_len);
    raw_off[i + 1] = sat_add(raw_off[i], recs[i].raw_len);
  }
  Py_DECREF(seq);
  Buffer stored, out;
  if (!get_buffer(stored_obj, &stored, false) || !get_buffer(out_obj, &out, true)) return nullptr;
  if (out.size() != raw_off[nblocks] || raw_off[nblocks] == kSaturated) {
    if (raw_off[nblocks] == kSaturated) {
      return PyErr_Format(PyExc_ValueError,
                          "output buffer is %zd bytes, the blocks hold more than 2**64 - 1",
                          out.view.len);
    }
    return PyErr_Format(PyExc_ValueError, "output buffer is %zd bytes, the blocks hold %zu",
                        out.view.len, raw_off[nblocks]);
  }
  // A short read shows up as the first block that runs past the end.
  for (Py_ssize_t i = 0; i < nblocks; ++i) {
    if (stored_off[i + 1] > stored.size() || stored_off[i + 1] == kSaturated) {
      const size_t have = stored.size() > stored_off[i] ? stored.size() - stored_off[i] : 0;
      return block_error(i, "truncated",
                         "truncated (" + std::to_string(have) + " of " +
                             std::to_string(recs[i].stored_len) + " bytes)");
    }
  }
  if (stored.size() != stored_off[nblocks]) {
    return PyErr_Format(PyExc_ValueError, "stored buffer is %zd bytes, the blocks hold %zu",
                        stored.view.len, stored_off[nblocks]);
  }
  std::vector<std::string> errs(static_cast<size_t>(nblocks));
  std::vector<char> crc_bad(static_cast<size_t>(nblocks), 0);
  const uint8_t* src = stored.data();
  uint8_t* dst = out.mutable_data();
  std::string pool_err;
  Py_BEGIN_ALLOW_THREADS
  try {
    shardckpt::ThreadPool::instance().parallel_for(
        static_cast<size_t>(nblocks), threads, [&](size_t i) {
          const BlockRecord& r = recs[i];
          const uint8_t* s = src + stored_off[i];
          // Never feed zstd bytes that failed their checksum.
          if (verify && shardckpt::crc32(s, r.stored_len) != r.crc) {
            crc_bad[i] = 1;
            return;
          }
          try {
            shardckpt::decode_block(s, r.stored_len, r, dst + raw_off[i], r.raw_len);
          } catch (const std::exception& e) {
            errs[i] = e.what();
          }
        });
  } catch (const std::exception& e) {
    pool_err = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!pool_err.empty()) {
    PyErr_SetString(PyExc_RuntimeError, pool_err.c_str());
    return nullptr;
  }
  // Report the lowest failing block, whatever order the threads ran in.
  for (Py_ssize_t i = 0; i < nblocks; ++i) {
    if (crc_bad[i]) return block_error(i, "checksum", "checksum mismatch");
    if (!errs[i].empty()) return block_error(i, "decode", errs[i]);
  }
  Py_RETURN_NONE;
}

PyObject* py_version(PyObject*, PyObject*) { return PyUnicode_FromString(kVersion); }

PyObject* py_zstd_version(PyObject*, PyObject*) {
  return PyUnicode_FromString(shardckpt::zstd_version().c_str());
}

PyMethodDef kMethods[] = {
    {"encode_block", py_encode_block, METH_VARARGS,
     "encode_block(raw, group, compress, level, sample_size) -> (bytes, record)"},
    {"decode_block", py_decode_block, METH_VARARGS,
     "decode_block(stored, record, out) -> None; does not check the crc"},
    {"encode_blocks", py_encode_blocks, METH_VARARGS,
     "encode_blocks(raw, group, compress, level, block_size, sample_size, threads)"
     " -> [(bytes, record), ...]"},
    {"decode_blocks", py_decode_blocks, METH_VARARGS,
     "decode_blocks(stored, records, out, threads, verify_crc) -> None; blocks lie back to back"
     " in stored and in out; raises ValueError with .block_index and .reason"},
    {"version", py_version, METH_NOARGS, "version of the extension"},
    {"zstd_version", py_zstd_version, METH_NOARGS, "version of the bundled zstd"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_native", "shardckpt native block codec (zstd 1.5.7, crc32, threads)",
    -1, kMethods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&kModule); }
