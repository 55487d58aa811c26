/*
 * generate.c: the whole lifecycle of the sdxl C API.
 *
 *   generate MODEL_DIR OUT.ppm [STEPS]
 *
 * 1. loads an SDXL base model (a diffusers folder),
 * 2. generates a 64x64 image with progress output and writes it as a binary PPM,
 * 3. runs again and stops halfway from the progress callback (SDXL_STATUS_CANCELLED),
 * 4. runs with a cancel token that is already cancelled (SDXL_STATUS_CANCELLED),
 * 5. starts a job, cancels it from another thread while it runs (SDXL_STATUS_CANCELLED),
 * 6. runs two jobs at once on the shared model; both must give the image of step 2,
 * 7. frees everything.
 *
 * Exit status 0 when every step behaved as expected. Build (see the Makefile):
 *   cc -std=c11 -Wall -Wextra -Wpedantic -Iinclude examples/c/generate.c dist/lib/libsdxl.a \
 *      -lpthread -lm -ldl -o generate
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sdxl.h"

static int failures = 0;

/* Checks a status, printing the thread's detailed error message when it is not `want`. */
static int expect(const char *what, sdxl_status got, sdxl_status want) {
    if (got == want) {
        printf("ok   %s: %s\n", what, sdxl_status_str(got));
        return 1;
    }
    char message[512];
    sdxl_last_error_message(message, sizeof message);
    printf("FAIL %s: got %d (%s), want %d (%s): %s\n", what, got, sdxl_status_str(got), want,
           sdxl_status_str(want), message);
    failures++;
    return 0;
}

static void on_log(int32_t level, const char *message, void *user_data) {
    (void)user_data;
    fprintf(stderr, "[sdxl %d] %s\n", level, message);
}

static int32_t print_progress(int32_t stage, uint32_t step, uint32_t total, double elapsed,
                              void *user_data) {
    (void)user_data;
    printf("  stage %d: step %u/%u (%.2f s)\n", stage, step, total, elapsed);
    return 0;
}

/* Stops the run once half of the steps are done. */
static int32_t stop_halfway(int32_t stage, uint32_t step, uint32_t total, double elapsed,
                            void *user_data) {
    (void)stage;
    (void)elapsed;
    uint32_t *last_step = user_data;
    *last_step = step;
    return step * 2 >= total ? 1 : 0;
}

struct previews {
    uint32_t calls;
    unsigned long checksum;
};

static void on_preview(int32_t stage, uint32_t step, uint32_t total, const uint8_t *rgb,
                       uint32_t width, uint32_t height, void *user_data) {
    (void)stage;
    (void)step;
    (void)total;
    struct previews *p = user_data;
    p->calls++;
    for (size_t i = 0; i < (size_t)width * height * 3; i++) p->checksum += rgb[i];
}

static int write_ppm(const char *path, const uint8_t *rgba, uint32_t width, uint32_t height) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    fprintf(f, "P6\n%u %u\n255\n", width, height);
    for (size_t i = 0; i < (size_t)width * height; i++) fwrite(rgba + 4 * i, 1, 3, f);
    return fclose(f) == 0;
}

/* --- a job cancelled from another thread ------------------------------------------------- */

struct handshake {
    atomic_int first_step_reached;
    atomic_int cancel_sent;
};

/* Runs on the job's worker thread: after the first step, waits until the other thread has
 * cancelled, so that the cancellation lands in the middle of the run. */
static int32_t wait_for_cancel(int32_t stage, uint32_t step, uint32_t total, double elapsed,
                               void *user_data) {
    (void)stage;
    (void)total;
    (void)elapsed;
    struct handshake *h = user_data;
    if (step == 1) {
        atomic_store(&h->first_step_reached, 1);
        while (!atomic_load(&h->cancel_sent)) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    }
    return 0;
}

struct canceller {
    sdxl_job *job;
    struct handshake *handshake;
    sdxl_status status;
};

static void *cancel_job(void *arg) {
    struct canceller *c = arg;
    while (!atomic_load(&c->handshake->first_step_reached)) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    c->status = sdxl_job_cancel(c->job);
    atomic_store(&c->handshake->cancel_sent, 1);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR OUT.ppm [STEPS]\n", argv[0]);
        return 2;
    }
    printf("%s, ABI %u (header %u)\n", sdxl_version(), sdxl_abi_version(),
           (unsigned)SDXL_ABI_VERSION);
    if (sdxl_abi_version() != SDXL_ABI_VERSION) {
        fprintf(stderr, "library and header ABI versions differ\n");
        return 1;
    }
    expect("set log callback", sdxl_set_log_callback(on_log, NULL, SDXL_LOG_INFO), SDXL_STATUS_OK);

    /* 1. Load. */
    sdxl_load_options options;
    sdxl_load_options_init(&options);
    sdxl_model *model = NULL;
    if (!expect("load model", sdxl_model_load(argv[1], &options, &model), SDXL_STATUS_OK))
        return 1;

    /* 2. Generate. */
    sdxl_generate_params params;
    sdxl_generate_params_init(&params);
    params.prompt = "a lighthouse on a cliff, stormy sea";
    params.negative_prompt = "blurry";
    params.width = 64;
    params.height = 64;
    params.steps = argc > 3 ? (uint32_t)atoi(argv[3]) : 4;
    params.seed = 42;
    params.progress = print_progress;
    struct previews previews = {0, 0};
    params.preview = on_preview;
    params.preview_user_data = &previews;

    size_t image_len = 0, latents_len = 0;
    expect("image size", sdxl_generate_image_size(&params, &image_len), SDXL_STATUS_OK);
    expect("latents size", sdxl_generate_latents_size(model, &params, &latents_len),
           SDXL_STATUS_OK);
    uint8_t *image = malloc(image_len);
    uint8_t *job_image = malloc(image_len);
    float *latents = malloc(latents_len * sizeof *latents);
    if (!image || !job_image || !latents) return 1;
    if (expect("generate", sdxl_generate(model, &params, image, image_len, latents, latents_len),
               SDXL_STATUS_OK)) {
        printf("  %u previews (checksum %lu), first latent %f\n", previews.calls,
               previews.checksum, latents[0]);
        if (previews.calls != params.steps) {
            printf("FAIL expected one preview per step\n");
            failures++;
        }
        if (!write_ppm(argv[2], image, params.width, params.height)) {
            printf("FAIL cannot write %s\n", argv[2]);
            failures++;
        } else {
            printf("wrote %s\n", argv[2]);
        }
    }
    params.preview = NULL;

    /* 3. Stop halfway from the progress callback. */
    uint32_t last_step = 0;
    params.progress = stop_halfway;
    params.progress_user_data = &last_step;
    expect("stop halfway", sdxl_generate(model, &params, image, image_len, NULL, 0),
           SDXL_STATUS_CANCELLED);
    printf("  stopped after step %u of %u\n", last_step, params.steps);

    /* 4. A cancelled token. */
    sdxl_cancel_token *token = NULL;
    expect("new token", sdxl_cancel_token_new(&token), SDXL_STATUS_OK);
    expect("cancel token", sdxl_cancel_token_cancel(token), SDXL_STATUS_OK);
    params.progress = NULL;
    params.progress_user_data = NULL;
    params.cancel = token;
    expect("cancelled token", sdxl_generate(model, &params, image, image_len, NULL, 0),
           SDXL_STATUS_CANCELLED);
    params.cancel = NULL;
    sdxl_cancel_token_free(token);

    /* 5. A job cancelled from another thread. */
    struct handshake handshake;
    atomic_init(&handshake.first_step_reached, 0);
    atomic_init(&handshake.cancel_sent, 0);
    params.progress = wait_for_cancel;
    params.progress_user_data = &handshake;
    sdxl_job *job = NULL;
    if (expect("start job", sdxl_job_start(model, &params, &job), SDXL_STATUS_OK)) {
        struct canceller c = {job, &handshake, -1};
        pthread_t thread;
        pthread_create(&thread, NULL, cancel_job, &c);
        expect("job cancelled from a thread", sdxl_job_wait(job, -1), SDXL_STATUS_CANCELLED);
        pthread_join(thread, NULL);
        expect("sdxl_job_cancel", c.status, SDXL_STATUS_OK);
        sdxl_job_progress progress;
        progress.struct_size = sizeof progress;
        expect("poll", sdxl_job_poll(job, &progress), SDXL_STATUS_OK);
        printf("  job: done %u, status %d, stopped at step %u of %u\n", progress.done,
               progress.status, progress.step, progress.total);
        expect("take image of a cancelled job", sdxl_job_take_image(job, job_image, image_len),
               SDXL_STATUS_CANCELLED);
        sdxl_job_free(job);
    }

    /* 6. Two jobs share the model at once; both give the image of the blocking call. */
    params.progress = NULL;
    params.progress_user_data = NULL;
    sdxl_job *jobs[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++)
        expect("start job", sdxl_job_start(model, &params, &jobs[i]), SDXL_STATUS_OK);
    for (int i = 0; i < 2; i++) {
        if (!jobs[i]) continue;
        expect("wait", sdxl_job_wait(jobs[i], -1), SDXL_STATUS_OK);
        memset(job_image, 0, image_len);
        expect("take image", sdxl_job_take_image(jobs[i], job_image, image_len), SDXL_STATUS_OK);
        if (memcmp(image, job_image, image_len) != 0) {
            printf("FAIL job %d's image differs from sdxl_generate's\n", i);
            failures++;
        } else {
            printf("ok   job %d's image equals sdxl_generate's\n", i);
        }
        sdxl_job_free(jobs[i]);
    }

    /* 7. Free everything. */
    free(latents);
    free(job_image);
    free(image);
    sdxl_model_free(model);
    sdxl_set_log_callback(NULL, NULL, SDXL_LOG_INFO);
    printf("%d failure(s)\n", failures);
    return failures == 0 ? 0 : 1;
}
