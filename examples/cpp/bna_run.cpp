// bna_run: serve a graph made by `bna-export build` from C++ with ONNX Runtime.
//
//   bna_run OUT.onnx X.npy [--provider cpu|cuda] [--batch-size N] [--threads N]
//
// Prints one line per image, `LABEL TRIGGERED` (TRIGGERED is 0 or 1), in the order of X. A
// summary line (provider, images, flagged, seconds) goes to stderr. X is a .npy array of
// float32/float64 (used as is) or uint8 (divided by 255) images, N×C×H×W or N×H×W, as
// `bna-export run` reads it. Exit code 0 on success, 2 on bad usage or bad input (one line on
// stderr), 1 when ONNX Runtime fails while running.
//
// This file is meant to be copied into a C++ service: load the graph once (`Runner`), then call
// `Runner::run` on batches.

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// An error in what the user gave us (exit 2), as opposed to a failure while running (exit 1).
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// .npy reading, with every field checked before use (the file is untrusted input).

struct Images {
  std::vector<int64_t> shape;  // N, C, H, W
  std::vector<float> data;
};

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot open the " + what);
  std::ostringstream buf;
  buf << f.rdbuf();
  if (f.bad()) throw BadInput(path + ": cannot read the " + what);
  return buf.str();
}

// The quoted value after `'key':` in a .npy header dict.
std::string header_field(const std::string& header, const std::string& key,
                         const std::string& path) {
  const std::string tag = "'" + key + "':";
  const size_t at = header.find(tag);
  if (at == std::string::npos) throw BadInput(path + ": not a .npy file (no '" + key + "')");
  size_t i = at + tag.size();
  while (i < header.size() && header[i] == ' ') ++i;
  return header.substr(i);
}

Images read_npy(const std::string& path) {
  const std::string raw = read_file(path, "images (.npy)");
  static const char kMagic[] = "\x93NUMPY";
  if (raw.size() < 10 || raw.compare(0, 6, kMagic, 6) != 0)
    throw BadInput(path + ": not a .npy file");
  const unsigned major = static_cast<unsigned char>(raw[6]);
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(raw[8]) | (static_cast<unsigned char>(raw[9]) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (raw.size() < 12) throw BadInput(path + ": truncated .npy header");
    for (int b = 3; b >= 0; --b) header_len = (header_len << 8) | static_cast<unsigned char>(raw[8 + b]);
    start = 12;
  } else {
    throw BadInput(path + ": unknown .npy format version " + std::to_string(major));
  }
  if (header_len > raw.size() - start) throw BadInput(path + ": truncated .npy header");
  const std::string header = raw.substr(start, header_len);
  const size_t offset = start + header_len;

  // dtype
  std::string descr = header_field(header, "descr", path);
  if (descr.size() < 2 || descr[0] != '\'') throw BadInput(path + ": bad dtype in .npy header");
  descr = descr.substr(1, descr.find('\'', 1) == std::string::npos ? 0 : descr.find('\'', 1) - 1);
  size_t itemsize = 0;
  if (descr == "<f4") itemsize = 4;
  else if (descr == "<f8") itemsize = 8;
  else if (descr == "|u1" || descr == "<u1") itemsize = 1;
  else throw BadInput(path + ": images have dtype " + descr + "; expected float32, float64 or uint8");

  if (header_field(header, "fortran_order", path).rfind("False", 0) != 0)
    throw BadInput(path + ": Fortran-ordered arrays are not supported (save a C-ordered array)");

  // shape: "(a, b, c)" with at most 4 non-negative integers
  const std::string shape_text = header_field(header, "shape", path);
  if (shape_text.empty() || shape_text[0] != '(') throw BadInput(path + ": bad shape in .npy header");
  std::vector<int64_t> shape;
  size_t i = 1;
  while (i < shape_text.size() && shape_text[i] != ')') {
    if (shape_text[i] == ' ' || shape_text[i] == ',') {
      ++i;
      continue;
    }
    if (shape_text[i] < '0' || shape_text[i] > '9') throw BadInput(path + ": bad shape in .npy header");
    int64_t v = 0;
    while (i < shape_text.size() && shape_text[i] >= '0' && shape_text[i] <= '9') {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) throw BadInput(path + ": shape too large");
      v = v * 10 + (shape_text[i++] - '0');
    }
    shape.push_back(v);
    if (shape.size() > 4) break;
  }
  if (shape.size() == 3) shape.insert(shape.begin() + 1, 1);  // N×H×W: one channel
  if (shape.size() != 4) throw BadInput(path + ": images must be N×C×H×W or N×H×W");
  if (shape[0] == 0) throw BadInput(path + ": the data set is empty");

  size_t count = 1;
  for (int64_t d : shape) {
    if (d <= 0 || static_cast<uint64_t>(d) > std::numeric_limits<size_t>::max() / itemsize / count)
      throw BadInput(path + ": bad shape in .npy header");
    count *= static_cast<size_t>(d);
  }
  if (raw.size() - offset != count * itemsize)
    throw BadInput(path + ": the file holds " + std::to_string(raw.size() - offset) +
                   " data bytes but its header says " + std::to_string(count * itemsize));

  Images out{shape, std::vector<float>(count)};
  const char* p = raw.data() + offset;
  for (size_t k = 0; k < count; ++k) {
    float v;
    if (itemsize == 4) {
      std::memcpy(&v, p + 4 * k, 4);
    } else if (itemsize == 8) {
      double d;
      std::memcpy(&d, p + 8 * k, 8);
      v = static_cast<float>(d);
    } else {
      v = static_cast<float>(static_cast<unsigned char>(p[k])) / 255.0f;
    }
    if (!std::isfinite(v)) throw BadInput(path + ": images hold NaN or Inf values");
    out.data[k] = v;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The runner: one session on a built graph, reused for every batch.

class Runner {
 public:
  Runner(const std::string& model_path, const std::string& provider, int threads)
      : env_(ORT_LOGGING_LEVEL_ERROR, "bna_run") {
    Ort::SessionOptions options;
    if (threads > 0) options.SetIntraOpNumThreads(threads);
    if (provider == "cuda") {
      const auto available = Ort::GetAvailableProviders();
      if (std::find(available.begin(), available.end(), "CUDAExecutionProvider") == available.end())
        throw BadInput(
            "--provider cuda: this ONNX Runtime has no CUDA execution provider "
            "(build against onnxruntime-gpu's library)");
      OrtCUDAProviderOptionsV2* cuda = nullptr;
      Ort::ThrowOnError(Ort::GetApi().CreateCUDAProviderOptions(&cuda));
      try {
        options.AppendExecutionProvider_CUDA_V2(*cuda);
      } catch (const Ort::Exception& e) {
        Ort::GetApi().ReleaseCUDAProviderOptions(cuda);
        throw BadInput(std::string("--provider cuda: CUDA is not usable: ") + e.what());
      }
      Ort::GetApi().ReleaseCUDAProviderOptions(cuda);
    } else if (provider != "cpu") {
      throw BadInput("unknown provider '" + provider + "': cpu or cuda");
    }
    provider_ = provider;

    // From bytes, so that no external-data path in the file is ever followed.
    const std::string bytes = read_file(model_path, "graph (.onnx)");
    try {
      session_ = Ort::Session(env_, bytes.data(), bytes.size(), options);
    } catch (const Ort::Exception& e) {
      throw BadInput(model_path + ": ONNX Runtime cannot load the graph: " + e.what());
    }
    Ort::AllocatorWithDefaultOptions alloc;
    if (!session_.GetModelMetadata().LookupCustomMetadataMapAllocated("bna.f_logits", alloc) ||
        session_.GetInputCount() != 1)
      throw BadInput(model_path + ": not a graph made by `bna-export build`");
    input_name_ = session_.GetInputNameAllocated(0, alloc).get();
    input_shape_ = session_.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
  }

  const std::string& provider() const { return provider_; }

  // Checks that images of this shape (N×C×H×W) fit the graph's input.
  void check_shape(const std::vector<int64_t>& shape, const std::string& path) const {
    bool ok = input_shape_.size() == shape.size();
    for (size_t d = 1; ok && d < shape.size(); ++d)
      ok = input_shape_[d] < 0 || input_shape_[d] == shape[d];
    if (!ok) {
      auto text = [](const std::vector<int64_t>& s, size_t from) {
        std::string t = "(";
        for (size_t d = from; d < s.size(); ++d) t += (d > from ? ", " : "") + std::to_string(s[d]);
        return t + ")";
      };
      throw BadInput(path + ": images are " + text(shape, 1) + " but the graph takes " +
                     text(input_shape_, 1));
    }
  }

  // Labels and flags of `n` images laid out as `shape` (its first entry is ignored).
  void run(const float* images, int64_t n, std::vector<int64_t> shape, std::vector<int64_t>& labels,
           std::vector<uint8_t>& flags) {
    shape[0] = n;
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);
    const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(memory, const_cast<float*>(images), count,
                                                       shape.data(), shape.size());
    const char* in_names[] = {input_name_.c_str()};
    const char* out_names[] = {"label", "triggered"};
    auto out = session_.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 2);
    const int64_t* label = out[0].GetTensorData<int64_t>();
    const bool* triggered = out[1].GetTensorData<bool>();
    labels.insert(labels.end(), label, label + n);
    for (int64_t k = 0; k < n; ++k) flags.push_back(triggered[k] ? 1 : 0);
  }

 private:
  Ort::Env env_;
  Ort::Session session_{nullptr};
  std::string provider_, input_name_;
  std::vector<int64_t> input_shape_;
};

const char kUsage[] =
    "usage: bna_run OUT.onnx X.npy [--provider cpu|cuda] [--batch-size N] [--threads N]\n"
    "\n"
    "Runs a graph made by `bna-export build` on the images in X.npy (float32/float64 as is,\n"
    "uint8 divided by 255; N×C×H×W or N×H×W) and prints one line per image: LABEL TRIGGERED\n"
    "(TRIGGERED 0 or 1). A summary goes to stderr.\n"
    "\n"
    "  --provider cpu|cuda  execution provider (default cpu); cuda fails when it is not there\n"
    "  --batch-size N       images per run of the graph (default 256)\n"
    "  --threads N          intra-op threads (default: ONNX Runtime's choice)\n";

int64_t positive(const std::string& flag, const std::string& value) {
  try {
    size_t used = 0;
    const long long v = std::stoll(value, &used);
    if (used == value.size() && v > 0) return v;
  } catch (const std::exception&) {
  }
  throw BadInput(flag + " takes a positive integer, not '" + value + "'");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string provider = "cpu";
  int64_t batch = 256, threads = 0;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      }
      if (a == "--provider" || a == "--batch-size" || a == "--threads") {
        if (i + 1 >= argc) throw BadInput(a + " needs a value");
        const std::string v = argv[++i];
        if (a == "--provider") provider = v;
        else if (a == "--batch-size") batch = positive(a, v);
        else threads = positive(a, v);
      } else if (a.rfind("--", 0) == 0) {
        throw BadInput("unknown option " + a + " (see --help)");
      } else {
        positional.push_back(a);
      }
    }
    if (positional.size() != 2) throw BadInput("expected OUT.onnx X.npy (see --help)");

    Runner runner(positional[0], provider, static_cast<int>(threads));
    const Images x = read_npy(positional[1]);
    runner.check_shape(x.shape, positional[1]);

    const int64_t n = x.shape[0];
    const size_t per_image = x.data.size() / static_cast<size_t>(n);
    std::vector<int64_t> labels;
    std::vector<uint8_t> flags;
    labels.reserve(n);
    flags.reserve(n);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < n; s += batch) {
      const int64_t m = std::min(batch, n - s);
      runner.run(x.data.data() + static_cast<size_t>(s) * per_image, m, x.shape, labels, flags);
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    std::string text;
    text.reserve(static_cast<size_t>(n) * 6);
    int64_t flagged = 0;
    for (int64_t k = 0; k < n; ++k) {
      text += std::to_string(labels[k]);
      text += flags[k] ? " 1\n" : " 0\n";
      flagged += flags[k];
    }
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    std::fprintf(stderr, "bna_run: provider %s: %lld images, %lld flagged as triggered, %.3f s\n",
                 runner.provider().c_str(), static_cast<long long>(n),
                 static_cast<long long>(flagged), seconds);
    return 0;
  } catch (const BadInput& e) {
    std::fprintf(stderr, "bna_run: %s\n", e.what());
    return 2;
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "bna_run: ONNX Runtime failed: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bna_run: %s\n", e.what());
    return 1;
  }
}
