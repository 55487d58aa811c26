// Drives sdxl.hpp (the RAII layer of the Unreal plugin) as plain C++17 against libsdxl:
//
//   sdxl_hpp_test MODEL_DIR [WIDTH HEIGHT STEPS]
//
// Prints one line per check and "N passed, M failed"; exits non-zero on any failure.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <type_traits>

#include "sdxl.hpp"

static_assert(!std::is_copy_constructible_v<sdxl::Model>, "Model is move-only");
static_assert(!std::is_copy_constructible_v<sdxl::Job>, "Job is move-only");
static_assert(!std::is_copy_constructible_v<sdxl::CancelToken>, "CancelToken is move-only");
static_assert(std::is_nothrow_move_constructible_v<sdxl::Model>, "Model moves");
static_assert(std::is_nothrow_move_constructible_v<sdxl::Job>, "Job moves");

namespace {

int passed = 0;
int failed = 0;

void check(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    (ok ? passed : failed)++;
}

template <class T>
bool expect_status(const sdxl::Result<T>& r, sdxl_status want, const std::string& what) {
    const bool ok = r.status() == want;
    check(ok, what + ": " + (r.ok() ? std::string("OK") : r.error().what()));
    return ok;
}

/// Every alpha is 255 and the colours are not all equal.
bool filled(const sdxl::Image& image) {
    if (image.rgba.size() != size_t{image.width} * image.height * 4 * image.count) return false;
    bool varied = false;
    for (size_t i = 0; i < image.rgba.size(); i += 4) {
        if (image.rgba[i + 3] != 255) return false;
        varied = varied || image.rgba[i] != image.rgba[0];
    }
    return varied;
}

void wait_for(const std::atomic<bool>& flag) {
    for (int i = 0; i < 30000 && !flag.load(); i++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2 && argc != 5) {
        std::fprintf(stderr, "usage: %s MODEL_DIR [WIDTH HEIGHT STEPS]\n", argv[0]);
        return 2;
    }
    const uint32_t width = argc == 5 ? static_cast<uint32_t>(std::atoi(argv[2])) : 64;
    const uint32_t height = argc == 5 ? static_cast<uint32_t>(std::atoi(argv[3])) : 64;
    const uint32_t steps = argc == 5 ? static_cast<uint32_t>(std::atoi(argv[4])) : 4;
    std::printf("%s\n", sdxl::version());
    check(sdxl::abi_matches(), "library ABI matches the header");

    expect_status(sdxl::Model::load(std::string(argv[1]) + "/no-such-folder"), SDXL_STATUS_IO,
                  "loading a missing folder");
    auto loaded = sdxl::Model::load(argv[1]);
    if (!expect_status(loaded, SDXL_STATUS_OK, "load")) return 1;
    const sdxl::Model model = std::move(loaded).value();
    auto kind = model.kind();
    check(kind.ok() && kind.value() == SDXL_MODEL_BASE, "kind is base");

    sdxl::Params params;
    params.prompt = "a red fox";
    params.negative_prompt = "blurry";
    params.raw.width = width;
    params.raw.height = height;
    params.raw.steps = steps;
    params.raw.seed = 5;

    // Blocking generation with progress.
    uint32_t calls = 0;
    params.progress = [&calls](int32_t, uint32_t, uint32_t, double) {
        calls++;
        return false;
    };
    auto image = model.generate(params);
    expect_status(image, SDXL_STATUS_OK, "generate");
    check(image.ok() && filled(image.value()), "image filled, alpha 255");
    check(calls == steps, "progress called once per step");

    // The progress callback stops the run.
    sdxl::Params stop = params;
    stop.progress = [](int32_t, uint32_t step, uint32_t, double) { return step >= 1; };
    expect_status(model.generate(stop), SDXL_STATUS_CANCELLED, "progress callback cancels");

    // A cancel token from another thread, during the run.
    auto token = sdxl::CancelToken::create();
    if (!expect_status(token, SDXL_STATUS_OK, "cancel token")) return 1;
    std::atomic<bool> first_step{false};
    std::atomic<bool> cancelled{false};
    sdxl::Params with_token = params;
    with_token.cancel = &token.value();
    with_token.progress = [&](int32_t, uint32_t step, uint32_t, double) {
        if (step == 1) {
            first_step = true;
            wait_for(cancelled);
        }
        return false;
    };
    std::thread canceller([&] {
        wait_for(first_step);
        check(token.value().cancel().ok(), "cancel from another thread");
        cancelled = true;
    });
    expect_status(model.generate(with_token), SDXL_STATUS_CANCELLED, "token cancels");
    canceller.join();

    // A job gives the blocking result; its callbacks stay alive inside the Job.
    std::atomic<uint32_t> previews{0};
    sdxl::Params job_params = params;
    job_params.progress = nullptr;
    job_params.preview = [&previews](int32_t, uint32_t, uint32_t, const uint8_t*, uint32_t,
                                     uint32_t) { previews++; };
    {
        auto job = model.start(job_params);
        if (!expect_status(job, SDXL_STATUS_OK, "job start")) return 1;
        sdxl::Job moved = std::move(job).value();
        auto done = moved.wait();
        check(done.ok() && done.value(), "job finished");
        auto progress = moved.poll();
        check(progress.ok() && progress.value().done == 1 && progress.value().step == steps,
              "job poll after the end");
        auto result = moved.take_image();
        check(result.ok() && image.ok() && result.value().rgba == image.value().rgba,
              "job image equals the blocking one");
        check(previews.load() == steps, "preview once per step");
    }

    // A job cancelled while running.
    first_step = false;
    cancelled = false;
    sdxl::Params slow = params;
    slow.progress = [&](int32_t, uint32_t step, uint32_t, double) {
        if (step == 1) {
            first_step = true;
            wait_for(cancelled);
        }
        return false;
    };
    {
        auto job = model.start(slow);
        if (!expect_status(job, SDXL_STATUS_OK, "job start")) return 1;
        wait_for(first_step);
        check(job.value().cancel().ok(), "job cancel");
        cancelled = true;
        expect_status(job.value().wait(), SDXL_STATUS_CANCELLED, "job ends cancelled");
        expect_status(job.value().take_image(), SDXL_STATUS_CANCELLED, "no image after cancel");
    }

    // Errors carry the status and the message.
    sdxl::Params bad = params;
    bad.raw.width = 7;
    auto err = model.generate(bad);
    check(!err.ok() && err.error().status == SDXL_STATUS_INVALID_ARGUMENT &&
              err.error().message.find("width") != std::string::npos,
          "bad width: " + (err.ok() ? std::string() : err.error().message));
#if SDXL_HPP_EXCEPTIONS
    try {
        (void)model.generate(bad).value_or_throw();
        check(false, "value_or_throw throws");
    } catch (const sdxl::Exception& e) {
        check(e.status() == SDXL_STATUS_INVALID_ARGUMENT, std::string("exception: ") + e.what());
    }
#endif

    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
