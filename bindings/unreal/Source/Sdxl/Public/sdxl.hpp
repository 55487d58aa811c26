// sdxl.hpp: a thin RAII C++17 layer over the C API of libsdxl (sdxl.h).
//
// - Model, CancelToken and Job own their handle and are move-only; destructors free it.
// - Errors are values: every fallible call returns sdxl::Result<T> (status + the library's
//   message), so the header works where exceptions are disabled (Unreal's default). When
//   exceptions are enabled, Result<T>::value_or_throw() throws sdxl::Exception instead.
// - Images come back as std::vector<uint8_t> (RGBA8, rows top to bottom); the *_into variants
//   write into a caller buffer (an Unreal TArray, a mapped texture) without a copy.
// - Callbacks are std::functions called through static trampolines; a Job keeps its callbacks
//   alive until it is destroyed. Callbacks must not throw (a throw stops the run).
//
// Thread rules are the C API's: a Model may be shared by threads; tokens and jobs may be used
// from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "sdxl.h"

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#define SDXL_HPP_EXCEPTIONS 1
#include <stdexcept>
#else
#define SDXL_HPP_EXCEPTIONS 0
#endif

namespace sdxl {

/// A failed call: its status and the library's detailed message.
struct Error {
    sdxl_status status = SDXL_STATUS_OK;
    std::string message;

    /// The error of the calling thread's last failed call.
    static Error last(sdxl_status status) {
        Error e{status, {}};
        const size_t needed = sdxl_last_error_message(nullptr, 0);
        if (needed > 1) {
            e.message.resize(needed);
            sdxl_last_error_message(&e.message[0], e.message.size());
            e.message.resize(needed - 1);
        } else {
            e.message = sdxl_status_str(status);
        }
        return e;
    }

    /// "<status text>: <message>".
    std::string what() const { return std::string(sdxl_status_str(status)) + ": " + message; }
};

#if SDXL_HPP_EXCEPTIONS
/// Thrown by Result<T>::value_or_throw().
class Exception : public std::runtime_error {
   public:
    explicit Exception(Error error) : std::runtime_error(error.what()), error_(std::move(error)) {}
    sdxl_status status() const noexcept { return error_.status; }
    const Error& error() const noexcept { return error_; }

   private:
    Error error_;
};
#endif

/// Either a T or an Error (a small std::expected).
template <class T>
class [[nodiscard]] Result {
   public:
    Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
    Result(Error error) : v_(std::move(error)) {}    // NOLINT
    bool ok() const noexcept { return v_.index() == 0; }
    explicit operator bool() const noexcept { return ok(); }
    /// The value; only valid when ok().
    T& value() & { return *std::get_if<0>(&v_); }
    const T& value() const& { return *std::get_if<0>(&v_); }
    T&& value() && { return std::move(*std::get_if<0>(&v_)); }
    /// The error; only valid when !ok().
    const Error& error() const { return *std::get_if<1>(&v_); }
    sdxl_status status() const { return ok() ? SDXL_STATUS_OK : error().status; }
#if SDXL_HPP_EXCEPTIONS
    T value_or_throw() && {
        if (!ok()) throw Exception(error());
        return std::move(*std::get_if<0>(&v_));
    }
#endif

   private:
    std::variant<T, Error> v_;
};

/// Result of a call without a value.
template <>
class [[nodiscard]] Result<void> {
   public:
    Result() = default;
    Result(Error error) : error_(std::move(error)) {}  // NOLINT
    bool ok() const noexcept { return !error_.has_value(); }
    explicit operator bool() const noexcept { return ok(); }
    const Error& error() const { return *error_; }
    sdxl_status status() const { return ok() ? SDXL_STATUS_OK : error_->status; }
#if SDXL_HPP_EXCEPTIONS
    void value_or_throw() const {
        if (!ok()) throw Exception(*error_);
    }
#endif

   private:
    std::optional<Error> error_;
};

namespace detail {
inline Result<void> check(sdxl_status status) {
    if (status == SDXL_STATUS_OK) return {};
    return Error::last(status);
}

template <class Ptr, void (*Free)(Ptr*)>
struct Deleter {
    void operator()(Ptr* p) const noexcept { Free(p); }
};
}  // namespace detail

/// True when the loaded library speaks this header's ABI; check it once at start-up.
inline bool abi_matches() noexcept { return sdxl_abi_version() == SDXL_ABI_VERSION; }

/// The library's version string.
inline const char* version() noexcept { return sdxl_version(); }

/// RGBA8 images, image after image, rows top to bottom.
struct Image {
    std::vector<uint8_t> rgba;
    uint32_t width = 0;
    uint32_t height = 0;
    uint32_t count = 0;
};

/// A flag that stops the runs it is passed to; cancel() works from any thread.
class CancelToken {
   public:
    static Result<CancelToken> create() {
        sdxl_cancel_token* raw = nullptr;
        if (auto r = detail::check(sdxl_cancel_token_new(&raw)); !r) return r.error();
        return CancelToken(raw);
    }
    Result<void> cancel() const { return detail::check(sdxl_cancel_token_cancel(get())); }
    const sdxl_cancel_token* get() const noexcept { return handle_.get(); }

   private:
    explicit CancelToken(sdxl_cancel_token* raw) : handle_(raw) {}
    std::unique_ptr<sdxl_cancel_token,
                    detail::Deleter<sdxl_cancel_token, sdxl_cancel_token_free>>
        handle_;
};

class Model;

/// Called after every step: stage (SDXL_STAGE_*), step, total, seconds; return true to stop.
using ProgressFn = std::function<bool(int32_t, uint32_t, uint32_t, double)>;
/// Called after every step with an RGB preview (width * height * 3 bytes, valid during the call).
using PreviewFn = std::function<void(int32_t, uint32_t, uint32_t, const uint8_t*, uint32_t, uint32_t)>;

/// What one generation needs: the raw C parameters (defaults from sdxl_generate_params_init)
/// plus owned strings and callbacks. Set size, steps, seed, … on `raw`.
struct Params {
    Params() { sdxl_generate_params_init(&raw); }

    sdxl_generate_params raw{};
    std::string prompt;
    std::optional<std::string> prompt_2;
    std::optional<std::string> negative_prompt;
    std::optional<std::string> negative_prompt_2;
    const CancelToken* cancel = nullptr;
    const Model* refiner = nullptr;
    ProgressFn progress;
    PreviewFn preview;
};

namespace detail {
/// Callbacks of one run, at a stable address (the C user_data).
struct Callbacks {
    ProgressFn progress;
    PreviewFn preview;

    static int32_t on_progress(int32_t stage, uint32_t step, uint32_t total, double seconds,
                               void* user) {
#if SDXL_HPP_EXCEPTIONS
        try {
            return static_cast<Callbacks*>(user)->progress(stage, step, total, seconds) ? 1 : 0;
        } catch (...) {
            return 1;  // never unwind into the library
        }
#else
        return static_cast<Callbacks*>(user)->progress(stage, step, total, seconds) ? 1 : 0;
#endif
    }
    static void on_preview(int32_t stage, uint32_t step, uint32_t total, const uint8_t* rgb,
                           uint32_t width, uint32_t height, void* user) {
#if SDXL_HPP_EXCEPTIONS
        try {
            static_cast<Callbacks*>(user)->preview(stage, step, total, rgb, width, height);
        } catch (...) {
        }
#else
        static_cast<Callbacks*>(user)->preview(stage, step, total, rgb, width, height);
#endif
    }
};
}  // namespace detail

/// A generation running on a library worker thread. Move-only; destroying it cancels, waits
/// for the worker and frees the job.
class Job {
   public:
    Job(Job&&) noexcept = default;
    Job& operator=(Job&& other) noexcept {
        handle_.reset();  // the old job first: its callbacks may still run until freed
        handle_ = std::move(other.handle_);
        callbacks_ = std::move(other.callbacks_);
        width_ = other.width_;
        height_ = other.height_;
        count_ = other.count_;
        return *this;
    }
    ~Job() { handle_.reset(); }  // before callbacks_ go away

    Result<sdxl_job_progress> poll() const {
        sdxl_job_progress p{};
        p.struct_size = sizeof p;
        if (auto r = detail::check(sdxl_job_poll(get(), &p)); !r) return r.error();
        return p;
    }
    Result<void> cancel() const { return detail::check(sdxl_job_cancel(get())); }
    /// true once finished successfully, false on timeout (negative = no limit); the job's error
    /// (SDXL_STATUS_CANCELLED, …) otherwise.
    Result<bool> wait(int32_t timeout_ms = -1) const {
        const sdxl_status s = sdxl_job_wait(get(), timeout_ms);
        if (s == SDXL_STATUS_TIMEOUT) return false;
        if (auto r = detail::check(s); !r) return r.error();
        return true;
    }
    /// Copies the finished images into `out` (e.g. TArray::GetData()).
    Result<void> take_image_into(uint8_t* out, size_t len) const {
        return detail::check(sdxl_job_take_image(get(), out, len));
    }
    Result<Image> take_image() const {
        Image image{std::vector<uint8_t>(size_t{width_} * height_ * 4 * count_), width_, height_,
                    count_};
        if (auto r = take_image_into(image.rgba.data(), image.rgba.size()); !r) return r.error();
        return image;
    }
    const sdxl_job* get() const noexcept { return handle_.get(); }

   private:
    friend class Model;
    Job(sdxl_job* raw, std::unique_ptr<detail::Callbacks> callbacks, const sdxl_generate_params& p)
        : callbacks_(std::move(callbacks)),
          handle_(raw),
          width_(p.width),
          height_(p.height),
          count_(p.num_images) {}

    std::unique_ptr<detail::Callbacks> callbacks_;
    std::unique_ptr<sdxl_job, detail::Deleter<sdxl_job, sdxl_job_free>> handle_;
    uint32_t width_ = 0;
    uint32_t height_ = 0;
    uint32_t count_ = 0;
};

/// A loaded SDXL base or refiner. Move-only; read-only after loading, shareable by threads.
class Model {
   public:
    /// Loads a diffusers folder; `options` NULL = defaults.
    static Result<Model> load(const std::string& path, const sdxl_load_options* options = nullptr) {
        sdxl_model* raw = nullptr;
        if (auto r = detail::check(sdxl_model_load(path.c_str(), options, &raw)); !r) {
            return r.error();
        }
        return Model(raw);
    }

    /// SDXL_MODEL_BASE or SDXL_MODEL_REFINER.
    Result<int32_t> kind() const {
        int32_t k = 0;
        if (auto r = detail::check(sdxl_model_kind(get(), &k)); !r) return r.error();
        return k;
    }

    /// Bytes of the RGBA8 output of `params`.
    static Result<size_t> image_size(const Params& params) {
        size_t n = 0;
        if (auto r = detail::check(sdxl_generate_image_size(&params.raw, &n)); !r) {
            return r.error();
        }
        return n;
    }

    /// Generates into a caller buffer of image_size() bytes (no copy); `latents` may be NULL.
    Result<void> generate_into(const Params& params, uint8_t* out, size_t len,
                               float* latents = nullptr, size_t latents_len = 0) const {
        detail::Callbacks callbacks{params.progress, params.preview};
        const sdxl_generate_params raw = bind(params, &callbacks);
        return detail::check(sdxl_generate(get(), &raw, out, len, latents, latents_len));
    }

    /// Generates and returns the images.
    Result<Image> generate(const Params& params) const {
        auto size = image_size(params);
        if (!size) return size.error();
        Image image{std::vector<uint8_t>(size.value()), params.raw.width, params.raw.height,
                    params.raw.num_images};
        if (auto r = generate_into(params, image.rgba.data(), image.rgba.size()); !r) {
            return r.error();
        }
        return image;
    }

    /// Starts the generation on a library worker thread; callbacks run there.
    Result<Job> start(const Params& params) const {
        auto callbacks = std::make_unique<detail::Callbacks>(
            detail::Callbacks{params.progress, params.preview});
        const sdxl_generate_params raw = bind(params, callbacks.get());
        sdxl_job* job = nullptr;
        if (auto r = detail::check(sdxl_job_start(get(), &raw, &job)); !r) return r.error();
        return Job(job, std::move(callbacks), raw);
    }

    const sdxl_model* get() const noexcept { return handle_.get(); }

   private:
    explicit Model(sdxl_model* raw) : handle_(raw) {}

    /// The C parameters with the owned strings, handles and trampolines filled in.
    static sdxl_generate_params bind(const Params& p, detail::Callbacks* callbacks) {
        sdxl_generate_params raw = p.raw;
        raw.prompt = p.prompt.c_str();
        raw.prompt_2 = p.prompt_2 ? p.prompt_2->c_str() : nullptr;
        raw.negative_prompt = p.negative_prompt ? p.negative_prompt->c_str() : nullptr;
        raw.negative_prompt_2 = p.negative_prompt_2 ? p.negative_prompt_2->c_str() : nullptr;
        raw.cancel = p.cancel ? p.cancel->get() : nullptr;
        raw.refiner = p.refiner ? p.refiner->get() : nullptr;
        raw.progress = callbacks->progress ? &detail::Callbacks::on_progress : nullptr;
        raw.progress_user_data = callbacks;
        raw.preview = callbacks->preview ? &detail::Callbacks::on_preview : nullptr;
        raw.preview_user_data = callbacks;
        return raw;
    }

    std::unique_ptr<sdxl_model, detail::Deleter<sdxl_model, sdxl_model_free>> handle_;
};

}  // namespace sdxl
