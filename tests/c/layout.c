/*
 * Prints the size, alignment and field offsets of every public struct of sdxl.h as JSON, for
 * the binding tests (Python ctypes, C#) to compare their declarations with:
 *
 *   {"abi_version": 1, "structs": {"sdxl_load_options": {"size": 32, "align": 8,
 *     "fields": {"struct_size": 0, ...}}, ...}}
 */
#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>

#include "sdxl.h"

static int first_struct = 1;
static int first_field = 1;

static void begin(const char *name, size_t size, size_t align) {
    printf("%s\n    \"%s\": {\"size\": %zu, \"align\": %zu, \"fields\": {", first_struct ? "" : ",",
           name, size, align);
    first_struct = 0;
    first_field = 1;
}

static void field(const char *name, size_t offset) {
    printf("%s\"%s\": %zu", first_field ? "" : ", ", name, offset);
    first_field = 0;
}

static void end(void) { printf("}}"); }

#define BEGIN(T) begin(#T, sizeof(T), alignof(T))
#define FIELD(T, f) field(#f, offsetof(T, f))

int main(void) {
    printf("{\"abi_version\": %u, \"structs\": {", (unsigned)SDXL_ABI_VERSION);

    BEGIN(sdxl_load_options);
    FIELD(sdxl_load_options, struct_size);
    FIELD(sdxl_load_options, device);
    FIELD(sdxl_load_options, device_index);
    FIELD(sdxl_load_options, dtype);
    FIELD(sdxl_load_options, vae_dtype);
    FIELD(sdxl_load_options, variant);
    end();

    BEGIN(sdxl_generate_params);
    FIELD(sdxl_generate_params, struct_size);
    FIELD(sdxl_generate_params, width);
    FIELD(sdxl_generate_params, height);
    FIELD(sdxl_generate_params, steps);
    FIELD(sdxl_generate_params, num_images);
    FIELD(sdxl_generate_params, scheduler);
    FIELD(sdxl_generate_params, karras);
    FIELD(sdxl_generate_params, timestep_spacing);
    FIELD(sdxl_generate_params, prediction_type);
    FIELD(sdxl_generate_params, original_width);
    FIELD(sdxl_generate_params, original_height);
    FIELD(sdxl_generate_params, crop_top);
    FIELD(sdxl_generate_params, crop_left);
    FIELD(sdxl_generate_params, target_width);
    FIELD(sdxl_generate_params, target_height);
    FIELD(sdxl_generate_params, negative_original_width);
    FIELD(sdxl_generate_params, negative_original_height);
    FIELD(sdxl_generate_params, negative_crop_top);
    FIELD(sdxl_generate_params, negative_crop_left);
    FIELD(sdxl_generate_params, negative_target_width);
    FIELD(sdxl_generate_params, negative_target_height);
    FIELD(sdxl_generate_params, init_image_format);
    FIELD(sdxl_generate_params, init_image_stride);
    FIELD(sdxl_generate_params, seed);
    FIELD(sdxl_generate_params, guidance_scale);
    FIELD(sdxl_generate_params, guidance_rescale);
    FIELD(sdxl_generate_params, strength);
    FIELD(sdxl_generate_params, refiner_start);
    FIELD(sdxl_generate_params, aesthetic_score);
    FIELD(sdxl_generate_params, negative_aesthetic_score);
    FIELD(sdxl_generate_params, prompt);
    FIELD(sdxl_generate_params, prompt_2);
    FIELD(sdxl_generate_params, negative_prompt);
    FIELD(sdxl_generate_params, negative_prompt_2);
    FIELD(sdxl_generate_params, init_image);
    FIELD(sdxl_generate_params, init_image_len);
    FIELD(sdxl_generate_params, refiner);
    FIELD(sdxl_generate_params, cancel);
    FIELD(sdxl_generate_params, progress);
    FIELD(sdxl_generate_params, progress_user_data);
    FIELD(sdxl_generate_params, preview);
    FIELD(sdxl_generate_params, preview_user_data);
    end();

    BEGIN(sdxl_job_progress);
    FIELD(sdxl_job_progress, struct_size);
    FIELD(sdxl_job_progress, stage);
    FIELD(sdxl_job_progress, step);
    FIELD(sdxl_job_progress, total);
    FIELD(sdxl_job_progress, status);
    FIELD(sdxl_job_progress, done);
    FIELD(sdxl_job_progress, elapsed_seconds);
    end();

    printf("\n}}\n");
    return 0;
}
