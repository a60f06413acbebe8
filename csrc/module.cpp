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

#include "block_hash.h"
#include "codec.h"
#include "crc32_fast.h"
#include "records.h"
#include "thread_pool.h"

namespace {

using shardckpt::BlockRecord;
using shardckpt::CodecError;
using shardckpt::parse_record;
using shardckpt::record_to_list;

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

// Below 64 KiB of input, dropping and taking back the GIL costs more than it frees:
// with other Python threads running (a save's encoders and writer), each release of
// a tiny encode or hash is a hand-off of the GIL and a wait to get it back.
bool keep_gil(size_t nbytes) { return nbytes < (64u << 10); }

bool check_group(int group) {
  if (group < 1 || group > shardckpt::kMaxGroup) {
    PyErr_Format(PyExc_ValueError, "group must be in 1..%d, not %d", shardckpt::kMaxGroup, group);
    return false;
  }
  return true;
}

// Appends each 16-byte digest to `list` as bytes; false with a Python error set.
bool append_digests(PyObject* list, const std::vector<uint8_t>& digests, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    PyObject* d = PyBytes_FromStringAndSize(
        reinterpret_cast<const char*>(digests.data() + i * shardckpt::kHashSize),
        shardckpt::kHashSize);
    if (d == nullptr) return false;
    const int rc = PyList_Append(list, d);
    Py_DECREF(d);
    if (rc != 0) return false;
  }
  return true;
}

bool parse_strategy(int v, shardckpt::Strategy* out) {
  if (v < 0 || v > 2) {
    PyErr_Format(PyExc_ValueError, "strategy must be 0 (zstd), 1 (auto) or 2 (huffman), not %d", v);
    return false;
  }
  *out = static_cast<shardckpt::Strategy>(v);
  return true;
}

// ---------------------------------------------------------------- functions

PyObject* py_encode_block(PyObject*, PyObject* args) {
  PyObject* raw_obj;
  int group, compress, level, strategy_arg = 1;
  Py_ssize_t sample;
  if (!PyArg_ParseTuple(args, "Oipin|i:encode_block", &raw_obj, &group, &compress, &level, &sample,
                        &strategy_arg))
    return nullptr;
  shardckpt::Strategy strategy;
  if (!check_group(group) || !parse_strategy(strategy_arg, &strategy)) return nullptr;
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
                                  reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out)), strategy);
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
  PyObject* hashes_obj = Py_None;
  int group, compress, level, threads, strategy_arg = 1;
  Py_ssize_t block_size, sample;
  if (!PyArg_ParseTuple(args, "Oipinni|iO:encode_blocks", &raw_obj, &group, &compress, &level,
                        &block_size, &sample, &threads, &strategy_arg, &hashes_obj))
    return nullptr;
  shardckpt::Strategy strategy;
  if (!check_group(group) || !parse_strategy(strategy_arg, &strategy)) return nullptr;
  if (hashes_obj != Py_None && !PyList_Check(hashes_obj)) {
    return PyErr_Format(PyExc_TypeError, "hashes must be a list or None");
  }
  const bool want_hashes = hashes_obj != Py_None;
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
  std::vector<uint8_t> digests(want_hashes ? nblocks * shardckpt::kHashSize : 0);
  const uint8_t* src = raw.data();
  std::string pool_err;
  PyThreadState* ts = keep_gil(n) ? nullptr : PyEval_SaveThread();
  try {
    shardckpt::ThreadPool::instance().parallel_for(nblocks, threads, [&](size_t i) {
      const size_t len = std::min(bs, n - i * bs);
      try {
        recs[i] = shardckpt::encode_block(
            src + i * bs, len, group, compress != 0, level, static_cast<size_t>(sample), dsts[i],
            strategy, want_hashes ? digests.data() + i * shardckpt::kHashSize : nullptr);
      } catch (const std::exception& e) {
        errs[i] = e.what();
      }
    });
  } catch (const std::exception& e) {
    pool_err = e.what();
  }
  if (ts != nullptr) PyEval_RestoreThread(ts);
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
  if (want_hashes && !append_digests(hashes_obj, digests, nblocks)) {
    Py_DECREF(result);
    return nullptr;
  }
  return result;
}

PyObject* py_hash_buffer(PyObject*, PyObject* args) {
  PyObject* raw_obj;
  Py_ssize_t block_size;
  int threads;
  if (!PyArg_ParseTuple(args, "Oni:hash_buffer", &raw_obj, &block_size, &threads)) return nullptr;
  if (block_size <= 0) return PyErr_Format(PyExc_ValueError, "block_size must be > 0");
  Buffer raw;
  if (!get_buffer(raw_obj, &raw, false)) return nullptr;
  const size_t n = raw.size();
  const size_t bs = static_cast<size_t>(block_size);
  const size_t nblocks = (n + bs - 1) / bs;
  std::vector<uint8_t> digests(nblocks * shardckpt::kHashSize);
  const uint8_t* src = raw.data();
  std::string pool_err;
  PyThreadState* ts = keep_gil(n) ? nullptr : PyEval_SaveThread();
  try {
    shardckpt::ThreadPool::instance().parallel_for(nblocks, threads, [&](size_t i) {
      shardckpt::block_hash(src + i * bs, std::min(bs, n - i * bs),
                            digests.data() + i * shardckpt::kHashSize);
    });
  } catch (const std::exception& e) {
    pool_err = e.what();
  }
  if (ts != nullptr) PyEval_RestoreThread(ts);
  if (!pool_err.empty()) {
    PyErr_SetString(PyExc_RuntimeError, pool_err.c_str());
    return nullptr;
  }
  PyObject* result = PyList_New(0);
  if (result == nullptr) return nullptr;
  if (!append_digests(result, digests, nblocks)) {
    Py_DECREF(result);
    return nullptr;
  }
  return result;
}

// hash_buffer over several buffers in one call: every block of every buffer on
// the pool at once, with the GIL released once (an incremental save hashes many
// small tensors; one call each would pay the GIL hand-off per tensor).
PyObject* py_hash_buffers(PyObject*, PyObject* args) {
  PyObject* seq_obj;
  Py_ssize_t block_size;
  int threads;
  if (!PyArg_ParseTuple(args, "Oni:hash_buffers", &seq_obj, &block_size, &threads)) {
    return nullptr;
  }
  if (block_size <= 0) return PyErr_Format(PyExc_ValueError, "block_size must be > 0");
  PyObject* seq = PySequence_Fast(seq_obj, "hash_buffers needs a sequence of buffers");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  std::vector<Buffer> bufs(static_cast<size_t>(count));
  const size_t bs = static_cast<size_t>(block_size);
  struct Span {
    const uint8_t* src;
    size_t len;
  };
  std::vector<Span> spans;
  size_t total = 0;
  for (Py_ssize_t k = 0; k < count; ++k) {
    if (!get_buffer(PySequence_Fast_GET_ITEM(seq, k), &bufs[static_cast<size_t>(k)], false)) {
      Py_DECREF(seq);
      return nullptr;
    }
    const Buffer& b = bufs[static_cast<size_t>(k)];
    total += b.size();
    for (size_t off = 0; off < b.size(); off += bs) {
      spans.push_back({b.data() + off, std::min(bs, b.size() - off)});
    }
  }
  Py_DECREF(seq);  // the buffers stay held by `bufs`
  PyObject* result = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(
      spans.size() * shardckpt::kHashSize));
  if (result == nullptr) return nullptr;
  uint8_t* out = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(result));
  std::string pool_err;
  PyThreadState* ts = keep_gil(total) ? nullptr : PyEval_SaveThread();
  try {
    shardckpt::ThreadPool::instance().parallel_for(spans.size(), threads, [&](size_t i) {
      shardckpt::block_hash(spans[i].src, spans[i].len, out + i * shardckpt::kHashSize);
    });
  } catch (const std::exception& e) {
    pool_err = e.what();
  }
  if (ts != nullptr) PyEval_RestoreThread(ts);
  if (!pool_err.empty()) {
    Py_DECREF(result);
    PyErr_SetString(PyExc_RuntimeError, pool_err.c_str());
    return nullptr;
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

// crc32(buffer, value=0, impl=None): zlib.crc32's arguments and result;
// `impl` ("zlib", "pclmul", "vpclmul") is for tests, an unavailable one runs zlib.
PyObject* py_crc32(PyObject*, PyObject* args) {
  PyObject *obj, *value = nullptr;
  const char* impl_name = nullptr;
  if (!PyArg_ParseTuple(args, "O|Oz:crc32", &obj, &value, &impl_name)) return nullptr;
  // Masked like zlib.crc32's value, so any int is accepted.
  unsigned long crc = value == nullptr ? 0 : PyLong_AsUnsignedLongMask(value);
  if (crc == static_cast<unsigned long>(-1) && PyErr_Occurred()) return nullptr;
  shardckpt::Crc32Impl impl = shardckpt::crc32_best_impl();
  if (impl_name != nullptr && !shardckpt::crc32_impl_from_name(impl_name, &impl))
    return PyErr_Format(PyExc_ValueError, "unknown crc32 impl %s", impl_name);
  Buffer buf;
  if (!get_buffer(obj, &buf, false)) return nullptr;
  uint32_t r = static_cast<uint32_t>(crc);
  // Below 64 KiB, dropping and taking back the GIL costs more than it frees.
  PyThreadState* ts = buf.size() >= (64u << 10) ? PyEval_SaveThread() : nullptr;
  r = shardckpt::crc32_update_with(impl, r, buf.data(), buf.size());
  if (ts != nullptr) PyEval_RestoreThread(ts);
  return PyLong_FromUnsignedLong(r);
}

PyObject* py_crc32_impl(PyObject*, PyObject*) {
  return PyUnicode_FromString(shardckpt::crc32_impl_name(shardckpt::crc32_best_impl()));
}

PyObject* py_version(PyObject*, PyObject*) { return PyUnicode_FromString(kVersion); }

PyObject* py_zstd_version(PyObject*, PyObject*) {
  return PyUnicode_FromString(shardckpt::zstd_version().c_str());
}

PyMethodDef kMethods[] = {
    {"encode_block", py_encode_block, METH_VARARGS,
     "encode_block(raw, group, compress, level, sample_size, strategy=1) -> (bytes, record);"
     " strategy 0: regular zstd frames (the Python reference's bytes), 1: auto, 2: Huffman-only"},
    {"decode_block", py_decode_block, METH_VARARGS,
     "decode_block(stored, record, out) -> None; does not check the crc"},
    {"encode_blocks", py_encode_blocks, METH_VARARGS,
     "encode_blocks(raw, group, compress, level, block_size, sample_size, threads, strategy=1,"
     " hashes=None) -> [(bytes, record), ...]; a `hashes` list gets each block's XXH3-128"
     " digest of the raw bytes appended, in block order"},
    {"hash_buffer", py_hash_buffer, METH_VARARGS,
     "hash_buffer(raw, block_size, threads) -> [16-byte XXH3-128 digest of each block]"},
    {"hash_buffers", py_hash_buffers, METH_VARARGS,
     "hash_buffers(buffers, block_size, threads) -> bytes: the 16-byte XXH3-128 digests of"
     " every block of every buffer, back to back in order (an empty buffer has no block)"},
    {"decode_blocks", py_decode_blocks, METH_VARARGS,
     "decode_blocks(stored, records, out, threads, verify_crc) -> None; blocks lie back to back"
     " in stored and in out; raises ValueError with .block_index and .reason"},
    {"crc32", py_crc32, METH_VARARGS,
     "crc32(buffer, value=0) -> int; zlib.crc32 by carry-less multiply where the CPU has it"},
    {"crc32_impl", py_crc32_impl, METH_NOARGS, "the crc32 implementation this CPU runs"},
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
