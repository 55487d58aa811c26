/*
 * bad_input.c: every function given NULLs, wrong struct sizes, out-of-range values, invalid
 * UTF-8 and small buffers returns the documented status and never crashes.
 *
 *   bad_input MODEL_DIR
 */
#define _POSIX_C_SOURCE 200809L
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "sdxl.h"

static int checks = 0;
static int failures = 0;

static void check_status(const char *what, sdxl_status got, sdxl_status want) {
    checks++;
    char message[256];
    sdxl_last_error_message(message, sizeof message);
    if (got != want) {
        printf("FAIL %s: got %d (%s), want %d (%s); last error: %s\n", what, got,
               sdxl_status_str(got), want, sdxl_status_str(want), message);
        failures++;
    } else if (want != SDXL_STATUS_OK && message[0] == '\0') {
        printf("FAIL %s: %s without a message\n", what, sdxl_status_str(got));
        failures++;
    } else {
        printf("ok   %s: %s%s%s\n", what, sdxl_status_str(got), want ? " - " : "",
               want ? message : "");
    }
}

static void check_true(const char *what, int ok) {
    checks++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) failures++;
}

#define EXPECT(call, want) check_status(#call, (call), (want))

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Blocks the job at its first step until `release` is set. */
struct gate {
    atomic_int reached;
    atomic_int release;
};

static int32_t hold_at_first_step(int32_t stage, uint32_t step, uint32_t total, double elapsed,
                                  void *user_data) {
    (void)stage;
    (void)total;
    (void)elapsed;
    struct gate *g = user_data;
    if (step == 1) {
        atomic_store(&g->reached, 1);
        while (!atomic_load(&g->release)) sleep_ms(1);
    }
    return 0;
}

static void version_and_errors(void) {
    check_true("sdxl_version is not empty", sdxl_version() && sdxl_version()[0] != '\0');
    check_true("sdxl_abi_version matches the header", sdxl_abi_version() == SDXL_ABI_VERSION);
    check_true("unknown status has a description",
               strcmp(sdxl_status_str(12345), "unknown status") == 0);
    check_true("every status has a description", sdxl_status_str(SDXL_STATUS_NOT_READY)[0] != 0);

    /* Produce a known message, then read it through small buffers. */
    EXPECT(sdxl_load_options_init(NULL), SDXL_STATUS_NULL_ARGUMENT);
    size_t needed = sdxl_last_error_message(NULL, 0);
    check_true("size query gives the message length + 1",
               needed == strlen("`options` is NULL") + 1);
    char small[4];
    memset(small, 'x', sizeof small);
    size_t got = sdxl_last_error_message(small, sizeof small);
    check_true("small buffer: returns the full size", got == needed);
    check_true("small buffer: truncated and NUL-terminated", memcmp(small, "`op", 4) == 0);
    char one[1] = {'x'};
    sdxl_last_error_message(one, 1);
    check_true("one-byte buffer: just the NUL", one[0] == '\0');
    check_true("NULL buffer with a length is a size query",
               sdxl_last_error_message(NULL, 100) == needed);

    EXPECT(sdxl_set_log_callback(NULL, NULL, 99), SDXL_STATUS_INVALID_ARGUMENT);
    EXPECT(sdxl_set_log_callback(NULL, NULL, -1), SDXL_STATUS_INVALID_ARGUMENT);
    EXPECT(sdxl_set_log_callback(NULL, NULL, SDXL_LOG_ERROR), SDXL_STATUS_OK);
}

static void loading(const char *model_dir) {
    sdxl_model *model = NULL;
    sdxl_load_options options;
    EXPECT(sdxl_load_options_init(&options), SDXL_STATUS_OK);
    check_true("options struct_size is set", options.struct_size == sizeof options);
    EXPECT(sdxl_model_load(NULL, &options, &model), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_model_load(model_dir, &options, NULL), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_model_load("/nonexistent/sdxl-model", &options, &model), SDXL_STATUS_IO);
    EXPECT(sdxl_model_load("/nonexistent/\xff\xfe", &options, &model),
           SDXL_STATUS_INVALID_ARGUMENT);
    options.struct_size = sizeof options - 8;
    EXPECT(sdxl_model_load(model_dir, &options, &model), SDXL_STATUS_ABI_MISMATCH);
    options.struct_size = sizeof options + 8;
    EXPECT(sdxl_model_load(model_dir, &options, &model), SDXL_STATUS_ABI_MISMATCH);
    sdxl_load_options_init(&options);
    options.dtype = 99;
    EXPECT(sdxl_model_load(model_dir, &options, &model), SDXL_STATUS_INVALID_ARGUMENT);
    sdxl_load_options_init(&options);
    options.device = 99;
    EXPECT(sdxl_model_load(model_dir, &options, &model), SDXL_STATUS_INVALID_ARGUMENT);
    sdxl_load_options_init(&options);
    options.variant = "\xc3\x28";
    EXPECT(sdxl_model_load(model_dir, &options, &model), SDXL_STATUS_INVALID_ARGUMENT);
    check_true("failed loads leave *out_model alone", model == NULL);
    int32_t kind = -7;
    EXPECT(sdxl_model_kind(NULL, &kind), SDXL_STATUS_NULL_ARGUMENT);
    check_true("failed calls leave outputs alone", kind == -7);
    sdxl_model_free(NULL);
    check_true("sdxl_model_free(NULL) is a no-op", 1);
}

static void cancel_tokens(void) {
    EXPECT(sdxl_cancel_token_new(NULL), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_cancel_token_cancel(NULL), SDXL_STATUS_NULL_ARGUMENT);
    sdxl_cancel_token_free(NULL);
    sdxl_cancel_token *token = NULL;
    EXPECT(sdxl_cancel_token_new(&token), SDXL_STATUS_OK);
    EXPECT(sdxl_cancel_token_cancel(token), SDXL_STATUS_OK);
    EXPECT(sdxl_cancel_token_cancel(token), SDXL_STATUS_OK);
    sdxl_cancel_token_free(token);
}

static void generation(const sdxl_model *model) {
    sdxl_generate_params p;
    EXPECT(sdxl_generate_params_init(NULL), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate_params_init(&p), SDXL_STATUS_OK);
    check_true("params struct_size is set", p.struct_size == sizeof p);
    check_true("documented defaults", p.width == 1024 && p.height == 1024 && p.steps == 50 &&
                                          p.num_images == 1 && p.guidance_scale == 5.0 &&
                                          p.scheduler == SDXL_DEFAULT && p.prompt == NULL);
    p.prompt = "a cat";
    p.width = 64;
    p.height = 64;
    p.steps = 2;

    size_t len = 0, latents_len = 0;
    EXPECT(sdxl_model_kind(model, NULL), SDXL_STATUS_NULL_ARGUMENT);
    int32_t kind = -1;
    EXPECT(sdxl_model_kind(model, &kind), SDXL_STATUS_OK);
    check_true("the fixture is a base model", kind == SDXL_MODEL_BASE);
    EXPECT(sdxl_generate_image_size(NULL, &len), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate_image_size(&p, NULL), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate_image_size(&p, &len), SDXL_STATUS_OK);
    check_true("image size is w*h*4*n", len == 64 * 64 * 4);
    EXPECT(sdxl_generate_latents_size(NULL, &p, &latents_len), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate_latents_size(model, NULL, &latents_len), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate_latents_size(model, &p, NULL), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate_latents_size(model, &p, &latents_len), SDXL_STATUS_OK);
    check_true("latents size is positive", latents_len > 0);

    static uint8_t image[64 * 64 * 4];
    static float latents[4 * 8 * 8 * 16];
    EXPECT(sdxl_generate(NULL, &p, image, sizeof image, NULL, 0), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate(model, NULL, image, sizeof image, NULL, 0), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate(model, &p, NULL, sizeof image, NULL, 0), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_generate(model, &p, image, sizeof image - 1, NULL, 0),
           SDXL_STATUS_BUFFER_TOO_SMALL);
    EXPECT(sdxl_generate(model, &p, image, sizeof image, latents, latents_len - 1),
           SDXL_STATUS_BUFFER_TOO_SMALL);

    sdxl_generate_params q = p;
    q.struct_size = sizeof q - 8;
    EXPECT(sdxl_generate(model, &q, image, sizeof image, NULL, 0), SDXL_STATUS_ABI_MISMATCH);
    EXPECT(sdxl_generate_image_size(&q, &len), SDXL_STATUS_ABI_MISMATCH);
    q.struct_size = sizeof q + 8;
    EXPECT(sdxl_generate(model, &q, image, sizeof image, NULL, 0), SDXL_STATUS_ABI_MISMATCH);
    q.struct_size = 0;
    EXPECT(sdxl_generate(model, &q, image, sizeof image, NULL, 0), SDXL_STATUS_ABI_MISMATCH);

#define WITH(field, value, want)                                                               \
    do {                                                                                       \
        q = p;                                                                                 \
        q.field = value;                                                                       \
        check_status("sdxl_generate with " #field " = " #value,                                \
                     sdxl_generate(model, &q, image, sizeof image, NULL, 0), want);            \
    } while (0)

    WITH(width, 0, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(height, 0, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(width, 60, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(steps, 0, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(num_images, 0, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(prompt, NULL, SDXL_STATUS_NULL_ARGUMENT);
    WITH(prompt, "caf\xe9", SDXL_STATUS_INVALID_ARGUMENT);
    WITH(prompt_2, "\xff", SDXL_STATUS_INVALID_ARGUMENT);
    WITH(negative_prompt, "\xc3", SDXL_STATUS_INVALID_ARGUMENT);
    WITH(negative_prompt_2, "\x80\x80", SDXL_STATUS_INVALID_ARGUMENT);
    WITH(scheduler, 99, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(karras, 2, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(timestep_spacing, 7, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(prediction_type, 7, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(guidance_rescale, 1.5, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(strength, 0.0, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(original_width, 512, SDXL_STATUS_INVALID_ARGUMENT);
    WITH(refiner, model, SDXL_STATUS_INVALID_ARGUMENT);

    static uint8_t init_rgba[64 * 64 * 4];
    q = p;
    q.init_image = init_rgba;
    q.init_image_len = sizeof init_rgba - 1;
    EXPECT(sdxl_generate(model, &q, image, sizeof image, NULL, 0), SDXL_STATUS_INVALID_ARGUMENT);
    q.init_image_len = sizeof init_rgba;
    q.init_image_stride = 64 * 4 - 1;
    EXPECT(sdxl_generate(model, &q, image, sizeof image, NULL, 0), SDXL_STATUS_INVALID_ARGUMENT);
    q.init_image_stride = 0;
    q.init_image_format = 5;
    EXPECT(sdxl_generate(model, &q, image, sizeof image, NULL, 0), SDXL_STATUS_INVALID_ARGUMENT);
}

static void jobs(const sdxl_model *model) {
    sdxl_generate_params p;
    sdxl_generate_params_init(&p);
    p.prompt = "a cat";
    p.width = 64;
    p.height = 64;
    p.steps = 2;
    sdxl_job *job = NULL;
    sdxl_job_progress progress;
    progress.struct_size = sizeof progress;
    static uint8_t image[64 * 64 * 4];
    float latent = 0;

    EXPECT(sdxl_job_start(NULL, &p, &job), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_start(model, NULL, &job), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_start(model, &p, NULL), SDXL_STATUS_NULL_ARGUMENT);
    p.width = 0;
    EXPECT(sdxl_job_start(model, &p, &job), SDXL_STATUS_INVALID_ARGUMENT);
    p.width = 64;
    check_true("failed starts leave *out_job alone", job == NULL);
    EXPECT(sdxl_job_poll(NULL, &progress), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_cancel(NULL), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_wait(NULL, 0), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_take_image(NULL, image, sizeof image), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_take_latents(NULL, &latent, 1), SDXL_STATUS_NULL_ARGUMENT);
    sdxl_job_free(NULL);

    /* A job held at its first step: not ready, timeouts. */
    struct gate gate;
    atomic_init(&gate.reached, 0);
    atomic_init(&gate.release, 0);
    p.progress = hold_at_first_step;
    p.progress_user_data = &gate;
    if (sdxl_job_start(model, &p, &job) != SDXL_STATUS_OK) {
        check_status("sdxl_job_start", SDXL_STATUS_PANIC, SDXL_STATUS_OK);
        return;
    }
    while (!atomic_load(&gate.reached)) sleep_ms(1);
    EXPECT(sdxl_job_poll(job, NULL), SDXL_STATUS_NULL_ARGUMENT);
    progress.struct_size = 4;
    EXPECT(sdxl_job_poll(job, &progress), SDXL_STATUS_ABI_MISMATCH);
    progress.struct_size = sizeof progress;
    EXPECT(sdxl_job_poll(job, &progress), SDXL_STATUS_OK);
    check_true("running job: not done, status OK", progress.done == 0 && progress.status == 0);
    EXPECT(sdxl_job_wait(job, 0), SDXL_STATUS_TIMEOUT);
    EXPECT(sdxl_job_wait(job, 20), SDXL_STATUS_TIMEOUT);
    EXPECT(sdxl_job_take_image(job, image, sizeof image), SDXL_STATUS_NOT_READY);
    atomic_store(&gate.release, 1);
    EXPECT(sdxl_job_wait(job, -1), SDXL_STATUS_OK);
    EXPECT(sdxl_job_poll(job, &progress), SDXL_STATUS_OK);
    check_true("finished job: done, status OK, all steps",
               progress.done == 1 && progress.status == 0 && progress.step == progress.total);
    EXPECT(sdxl_job_take_image(job, NULL, sizeof image), SDXL_STATUS_NULL_ARGUMENT);
    EXPECT(sdxl_job_take_image(job, image, sizeof image - 1), SDXL_STATUS_BUFFER_TOO_SMALL);
    EXPECT(sdxl_job_take_image(job, image, sizeof image), SDXL_STATUS_OK);
    EXPECT(sdxl_job_take_image(job, image, sizeof image), SDXL_STATUS_OK);
    EXPECT(sdxl_job_take_latents(job, &latent, 1), SDXL_STATUS_BUFFER_TOO_SMALL);
    static float latents[4 * 8 * 8 * 16];
    size_t latents_len = 0;
    EXPECT(sdxl_generate_latents_size(model, &p, &latents_len), SDXL_STATUS_OK);
    EXPECT(sdxl_job_take_latents(job, NULL, latents_len), SDXL_STATUS_NULL_ARGUMENT);
    if (latents_len <= sizeof latents / sizeof latents[0])
        EXPECT(sdxl_job_take_latents(job, latents, latents_len), SDXL_STATUS_OK);
    EXPECT(sdxl_job_cancel(job), SDXL_STATUS_OK);
    EXPECT(sdxl_job_wait(job, 0), SDXL_STATUS_OK);
    sdxl_job_free(job);

    /* Freeing a job that is still held at its first step cancels it and joins the thread. */
    atomic_store(&gate.reached, 0);
    atomic_store(&gate.release, 0);
    job = NULL;
    EXPECT(sdxl_job_start(model, &p, &job), SDXL_STATUS_OK);
    while (!atomic_load(&gate.reached)) sleep_ms(1);
    atomic_store(&gate.release, 1);
    sdxl_job_free(job);
    check_true("sdxl_job_free on a running job returns", 1);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    version_and_errors();
    loading(argv[1]);
    cancel_tokens();
    sdxl_model *model = NULL;
    EXPECT(sdxl_model_load(argv[1], NULL, &model), SDXL_STATUS_OK);
    if (model) {
        generation(model);
        jobs(model);
    }
    sdxl_model_free(model);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
