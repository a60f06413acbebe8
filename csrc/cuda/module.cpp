// shardckpt._cuda: the CPython binding of the GPU snapshot copy engine.
//
// Plain C API and the plain CUDA runtime, like shardckpt._native: pointers and
// stream handles come in as integers, so neither torch's C++ headers nor its
// ABI are needed and the module builds with nvcc alone. Importing it needs no
// GPU; the first call that does raises shardckpt._cuda.CudaError.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cuda_runtime.h>

#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "copy_engine.h"

namespace {

using shardckpt_cuda::CudaError;

constexpr const char* kVersion = "0.1.0";
PyObject* g_cuda_error = nullptr;

// Turns a C++ exception into the Python one; returns nullptr for the caller.
PyObject* raise_current() {
  try {
    throw;
  } catch (const CudaError& e) {
    PyObject* args = Py_BuildValue("(si)", e.what(), e.code);
    if (args != nullptr) {
      PyErr_SetObject(g_cuda_error, args);
      Py_DECREF(args);
    }
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

bool require_device(int device) {
  int n = shardckpt_cuda::device_count();
  if (n == 0) {
    std::string why = shardckpt_cuda::device_problem();
    PyObject* args = Py_BuildValue("(si)", ("shardckpt._cuda: no usable CUDA device (" + why +
                                            "); the GPU data path needs a CUDA driver and a GPU")
                                               .c_str(),
                                   static_cast<int>(cudaErrorNoDevice));
    if (args != nullptr) {
      PyErr_SetObject(g_cuda_error, args);
      Py_DECREF(args);
    }
    return false;
  }
  if (device < 0 || device >= n) {
    PyErr_Format(PyExc_ValueError, "CUDA device %d does not exist (this process sees %d)", device,
                 n);
    return false;
  }
  return true;
}

// -- PinnedBuffer: pinned host memory with the buffer protocol, so Python can
// view it as a tensor (torch.frombuffer) without a copy.
struct PinnedObject {
  PyObject_HEAD
  shardckpt_cuda::PinnedBuffer* buf;
  int device;
};

int pinned_init(PinnedObject* self, PyObject* args, PyObject* kwds) {
  static const char* kw[] = {"nbytes", "device", nullptr};
  unsigned long long nbytes = 0;
  int device = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|i", const_cast<char**>(kw), &nbytes, &device))
    return -1;
  if (self->buf != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "PinnedBuffer is already initialised");
    return -1;
  }
  if (!require_device(device)) return -1;
  shardckpt_cuda::PinnedBuffer* made = nullptr;
  std::exception_ptr err;
  // cudaHostAlloc takes ~0.7 s per GiB: never with the GIL held.
  Py_BEGIN_ALLOW_THREADS
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  try {
    // The context of the tensors' device, not device 0's: a rank must not
    // create a context on someone else's GPU just to pin memory.
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess)
      throw CudaError(std::string("cudaSetDevice: ") + cudaGetErrorString(e), e);
    made = new shardckpt_cuda::PinnedBuffer(static_cast<size_t>(nbytes));
  } catch (...) {
    err = std::current_exception();
  }
  if (prev >= 0) cudaSetDevice(prev);
  Py_END_ALLOW_THREADS
  if (err) {
    try {
      std::rethrow_exception(err);
    } catch (...) {
      raise_current();
    }
    return -1;
  }
  self->buf = made;
  self->device = device;
  return 0;
}

void pinned_dealloc(PinnedObject* self) {
  delete self->buf;
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

int pinned_getbuffer(PinnedObject* self, Py_buffer* view, int flags) {
  if (self->buf == nullptr) {
    PyErr_SetString(PyExc_BufferError, "PinnedBuffer is not initialised");
    view->obj = nullptr;
    return -1;
  }
  return PyBuffer_FillInfo(view, reinterpret_cast<PyObject*>(self), self->buf->data(),
                           static_cast<Py_ssize_t>(self->buf->size()), 0, flags);
}

PyBufferProcs kPinnedBuffer = {reinterpret_cast<getbufferproc>(pinned_getbuffer), nullptr};

PyObject* pinned_nbytes(PinnedObject* self, void*) {
  return PyLong_FromSize_t(self->buf ? self->buf->size() : 0);
}
PyObject* pinned_address(PinnedObject* self, void*) {
  return PyLong_FromVoidPtr(self->buf ? self->buf->data() : nullptr);
}
PyObject* pinned_device(PinnedObject* self, void*) { return PyLong_FromLong(self->device); }

PyGetSetDef kPinnedGetSet[] = {
    {"nbytes", reinterpret_cast<getter>(pinned_nbytes), nullptr, "size in bytes", nullptr},
    {"address", reinterpret_cast<getter>(pinned_address), nullptr, "host address", nullptr},
    {"device", reinterpret_cast<getter>(pinned_device), nullptr, "device it was pinned for",
     nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject kPinnedType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// snapshot(pinned, segments, after, ring_offset, ring_bytes, slot_bytes, threads) -> dict
//   segments: [(device, src_ptr, nbytes, direct, dst)], dst an offset into
//   `pinned` when direct, else a pageable host address the caller owns.
//   after: [(device, stream_handle)]
PyObject* py_snapshot(PyObject*, PyObject* args) {
  PyObject* pinned_obj = nullptr;
  PyObject* seg_list = nullptr;
  PyObject* after_list = nullptr;
  unsigned long long ring_off = 0, ring_bytes = 0, slot_bytes = 0;
  int threads = 1;
  if (!PyArg_ParseTuple(args, "OO!O!KKKi", &pinned_obj, &PyList_Type, &seg_list, &PyList_Type,
                        &after_list, &ring_off, &ring_bytes, &slot_bytes, &threads))
    return nullptr;
  shardckpt_cuda::PinnedBuffer* pinned = nullptr;
  if (pinned_obj != Py_None) {
    if (!PyObject_TypeCheck(pinned_obj, &kPinnedType)) {
      PyErr_SetString(PyExc_TypeError, "pinned must be a PinnedBuffer or None");
      return nullptr;
    }
    pinned = reinterpret_cast<PinnedObject*>(pinned_obj)->buf;
  }
  const size_t psize = pinned ? pinned->size() : 0;
  if (ring_bytes > 0 && (pinned == nullptr || ring_off > psize || ring_bytes > psize - ring_off)) {
    PyErr_SetString(PyExc_ValueError, "the ring does not lie inside the pinned buffer");
    return nullptr;
  }
  std::vector<shardckpt_cuda::Segment> segs;
  const Py_ssize_t n = PyList_GET_SIZE(seg_list);
  segs.reserve(static_cast<size_t>(n));
  int max_device = -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    int device = 0, direct = 0;
    unsigned long long src = 0, nbytes = 0, dst = 0;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(seg_list, i), "iKKpK;segment: (device, src, nbytes, "
                          "direct, dst)", &device, &src, &nbytes, &direct, &dst))
      return nullptr;
    if (device > max_device) max_device = device;
    shardckpt_cuda::Segment s;
    s.device = device;
    s.src = static_cast<uintptr_t>(src);
    s.nbytes = static_cast<size_t>(nbytes);
    s.direct = direct != 0;
    if (s.direct) {
      // Bounds are checked here, and overlap with the ring: a wrong layout
      // must fail loudly, never scribble over another tensor's bytes.
      if (pinned == nullptr || dst > psize || nbytes > psize - dst) {
        PyErr_Format(PyExc_ValueError, "segment %zd: [%llu, +%llu) is outside the pinned buffer",
                     i, dst, nbytes);
        return nullptr;
      }
      if (ring_bytes > 0 && nbytes > 0 && dst < ring_off + ring_bytes && ring_off < dst + nbytes) {
        PyErr_Format(PyExc_ValueError, "segment %zd overlaps the ring", i);
        return nullptr;
      }
      s.dst = pinned->data() + dst;
    } else {
      if (ring_bytes == 0 || slot_bytes == 0 || slot_bytes > ring_bytes) {
        PyErr_Format(PyExc_ValueError, "segment %zd is streamed but there is no ring slot", i);
        return nullptr;
      }
      s.dst = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(dst));
    }
    segs.push_back(s);
  }
  std::vector<shardckpt_cuda::StreamRef> after;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(after_list); ++i) {
    shardckpt_cuda::StreamRef r;
    unsigned long long handle = 0;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(after_list, i), "iK;after: (device, stream)",
                          &r.device, &handle))
      return nullptr;
    r.stream = static_cast<uintptr_t>(handle);
    after.push_back(r);
  }
  if (max_device >= 0 && !require_device(max_device)) return nullptr;
  uint8_t* ring = ring_bytes > 0 ? pinned->data() + ring_off : nullptr;
  shardckpt_cuda::SnapshotStats st;
  std::exception_ptr err;
  Py_BEGIN_ALLOW_THREADS
  try {
    st = shardckpt_cuda::snapshot(segs, after, ring, static_cast<size_t>(ring_bytes),
                                  static_cast<size_t>(slot_bytes), threads);
  } catch (...) {
    err = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (err) {
    try {
      std::rethrow_exception(err);
    } catch (...) {
      return raise_current();
    }
  }
  return Py_BuildValue("{s:d,s:d,s:d,s:K,s:K,s:K}", "enqueue_s", st.enqueue_s, "stream_s",
                       st.stream_s, "wait_s", st.wait_s, "direct_bytes",
                       static_cast<unsigned long long>(st.direct_bytes), "streamed_bytes",
                       static_cast<unsigned long long>(st.streamed_bytes), "chunks",
                       static_cast<unsigned long long>(st.chunks));
}

PyObject* py_device_count(PyObject*, PyObject*) {
  return PyLong_FromLong(shardckpt_cuda::device_count());
}

PyObject* py_device_problem(PyObject*, PyObject*) {
  return PyUnicode_FromString(shardckpt_cuda::device_problem().c_str());
}

PyObject* py_stats(PyObject*, PyObject*) {
  return Py_BuildValue("{s:K,s:K,s:K}", "pinned_bytes",
                       static_cast<unsigned long long>(shardckpt_cuda::pinned_bytes_held()),
                       "pinned_allocations",
                       static_cast<unsigned long long>(shardckpt_cuda::pinned_allocations()),
                       "copy_streams",
                       static_cast<unsigned long long>(shardckpt_cuda::copy_streams()));
}

PyObject* py_runtime_version(PyObject*, PyObject*) {
  return PyLong_FromLong(shardckpt_cuda::runtime_version());
}

PyObject* py_version(PyObject*, PyObject*) { return PyUnicode_FromString(kVersion); }

PyMethodDef kMethods[] = {
    {"snapshot", py_snapshot, METH_VARARGS,
     "snapshot(pinned, segments, after, ring_offset, ring_bytes, slot_bytes, threads) -> stats;"
     " copies device ranges to the host, ordered after the `after` streams, GIL released"},
    {"device_count", py_device_count, METH_NOARGS, "CUDA devices visible (0 without a driver)"},
    {"device_problem", py_device_problem, METH_NOARGS, "why device_count() is 0, else ''"},
    {"stats", py_stats, METH_NOARGS, "pinned bytes held, cudaHostAlloc calls, copy streams"},
    {"runtime_version", py_runtime_version, METH_NOARGS, "CUDA runtime version linked in"},
    {"version", py_version, METH_NOARGS, "version of the extension"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_cuda", "shardckpt GPU snapshot copies (CUDA runtime, pinned pool)",
    -1, kMethods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__cuda(void) {
  kPinnedType.tp_name = "shardckpt._cuda.PinnedBuffer";
  kPinnedType.tp_basicsize = sizeof(PinnedObject);
  kPinnedType.tp_flags = Py_TPFLAGS_DEFAULT;
  kPinnedType.tp_doc = "PinnedBuffer(nbytes, device=0): page-locked host memory (cudaHostAlloc)";
  kPinnedType.tp_new = PyType_GenericNew;
  kPinnedType.tp_init = reinterpret_cast<initproc>(pinned_init);
  kPinnedType.tp_dealloc = reinterpret_cast<destructor>(pinned_dealloc);
  kPinnedType.tp_as_buffer = &kPinnedBuffer;
  kPinnedType.tp_getset = kPinnedGetSet;
  if (PyType_Ready(&kPinnedType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  g_cuda_error = PyErr_NewExceptionWithDoc(
      "shardckpt._cuda.CudaError", "A CUDA runtime call failed; args are (message, cudaError_t).",
      PyExc_RuntimeError, nullptr);
  Py_INCREF(&kPinnedType);
  if (g_cuda_error == nullptr || PyModule_AddObject(m, "CudaError", g_cuda_error) < 0 ||
      PyModule_AddObject(m, "PinnedBuffer", reinterpret_cast<PyObject*>(&kPinnedType)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  Py_INCREF(g_cuda_error);
  return m;
}
