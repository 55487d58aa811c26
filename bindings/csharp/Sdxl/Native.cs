// The raw C interface of libsdxl (include/sdxl.h) for C# / Unity: DllImport with Cdecl,
// blittable structs with explicit fixed-width fields, IntPtr for strings, handles inside
// structs and function pointers. The public API in Sdxl.cs wraps these.
using System;
using System.Runtime.InteropServices;

namespace Sdxl
{
    /// <summary>SDXL_STATUS_*.</summary>
    public enum Status
    {
        Ok = 0, NullArgument = 1, InvalidArgument = 2, Io = 3, ModelFormat = 4, Unsupported = 5,
        Device = 6, Cancelled = 7, Panic = 8, AbiMismatch = 9, NonFinite = 10,
        BufferTooSmall = 11, Timeout = 12, Poisoned = 13, NotReady = 14,
    }

    /// <summary>SDXL_LOG_*.</summary>
    public enum LogLevel { Trace = 0, Debug = 1, Info = 2, Warn = 3, Error = 4 }

    /// <summary>SDXL_DEVICE_*.</summary>
    public enum Device { Cpu = 0, Cuda = 1, Metal = 2 }

    /// <summary>SDXL_DTYPE_*.</summary>
    public enum DType { Auto = -1, F32 = 0, F16 = 1, BF16 = 2 }

    /// <summary>SDXL_MODEL_*.</summary>
    public enum ModelKind { Base = 0, Refiner = 1 }

    /// <summary>SDXL_SCHEDULER_*; Default = the model's scheduler config.</summary>
    public enum Scheduler
    {
        Default = -1, Euler = 0, EulerAncestral = 1, Ddim = 2, DpmPP2M = 3, DpmPP3M = 4,
        DpmPP2MSde = 5, Heun = 6, Kdpm2 = 7, UniPC = 8, Ddpm = 9, Lcm = 10, Lms = 11,
    }

    /// <summary>SDXL_STAGE_*.</summary>
    public enum Stage { Base = 0, Refiner = 1, Img2Img = 2 }

    /// <summary>SDXL_PIXEL_*: the layout of an init image.</summary>
    public enum PixelFormat { Rgba8 = 0, Rgb8 = 1 }

    /// <summary>struct sdxl_load_options.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct LoadOptions
    {
        public uint struct_size;
        public int device;
        public uint device_index;
        public int dtype;
        public int vae_dtype;
        public IntPtr variant;
    }

    /// <summary>struct sdxl_generate_params (fill with sdxl_generate_params_init).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct GenerateParams
    {
        public uint struct_size;
        public uint width;
        public uint height;
        public uint steps;
        public uint num_images;
        public int scheduler;
        public int karras;
        public int timestep_spacing;
        public int prediction_type;
        public uint original_width;
        public uint original_height;
        public uint crop_top;
        public uint crop_left;
        public uint target_width;
        public uint target_height;
        public uint negative_original_width;
        public uint negative_original_height;
        public uint negative_crop_top;
        public uint negative_crop_left;
        public uint negative_target_width;
        public uint negative_target_height;
        public int init_image_format;
        public uint init_image_stride;
        public ulong seed;
        public double guidance_scale;
        public double guidance_rescale;
        public double strength;
        public double refiner_start;
        public double aesthetic_score;
        public double negative_aesthetic_score;
        public IntPtr prompt;
        public IntPtr prompt_2;
        public IntPtr negative_prompt;
        public IntPtr negative_prompt_2;
        public IntPtr init_image;
        public UIntPtr init_image_len;
        public IntPtr refiner;
        public IntPtr cancel;
        public IntPtr progress;
        public IntPtr progress_user_data;
        public IntPtr preview;
        public IntPtr preview_user_data;
    }

    /// <summary>struct sdxl_job_progress.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct JobProgress
    {
        public uint struct_size;
        public int stage;
        public uint step;
        public uint total;
        public int status;
        public byte done;
        public double elapsed_seconds;

        /// <summary>True once the job has finished (successfully or not).</summary>
        public bool Done { get { return done != 0; } }
    }

    /// <summary>sdxl_log_fn.</summary>
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    public delegate void LogFn(int level, IntPtr message, IntPtr userData);

    /// <summary>sdxl_progress_fn.</summary>
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    public delegate int ProgressFn(int stage, uint step, uint total, double elapsedSeconds, IntPtr userData);

    /// <summary>sdxl_preview_fn.</summary>
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    public delegate void PreviewFn(int stage, uint step, uint total, IntPtr rgb, uint width, uint height, IntPtr userData);

#if !UNITY_5_3_OR_NEWER
    /// <summary>Unity's marker for static methods called from native code (AOT/IL2CPP);
    /// defined here for other runtimes so the same source compiles everywhere.</summary>
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type type) { Type = type; }
        public Type Type { get; private set; }
    }
#endif

    /// <summary>Every function of sdxl.h.</summary>
    public static class Native
    {
#if UNITY_IOS && !UNITY_EDITOR
        public const string Library = "__Internal";
#else
        public const string Library = "sdxl";
#endif
        /// <summary>SDXL_ABI_VERSION of the header these declarations mirror.</summary>
        public const uint AbiVersion = 1;
        public const int Default = -1;

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern uint sdxl_abi_version();

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern IntPtr sdxl_version();

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern IntPtr sdxl_status_str(int status);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern UIntPtr sdxl_last_error_message(byte[] buf, UIntPtr len);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_set_log_callback(IntPtr callback, IntPtr userData, int minLevel);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_load_options_init(ref LoadOptions options);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_model_load(IntPtr path, ref LoadOptions options, out ModelHandle model);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_model_kind(ModelHandle model, out int kind);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern void sdxl_model_free(IntPtr model);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_cancel_token_new(out CancelTokenHandle token);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_cancel_token_cancel(CancelTokenHandle token);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern void sdxl_cancel_token_free(IntPtr token);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_generate_params_init(ref GenerateParams parameters);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_generate_image_size(ref GenerateParams parameters, out UIntPtr len);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_generate_latents_size(ModelHandle model, ref GenerateParams parameters, out UIntPtr len);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_generate(ModelHandle model, ref GenerateParams parameters,
            IntPtr outRgba, UIntPtr outRgbaLen, IntPtr outLatents, UIntPtr outLatentsLen);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_job_start(ModelHandle model, ref GenerateParams parameters, out IntPtr job);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_job_poll(JobHandle job, ref JobProgress progress);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_job_cancel(JobHandle job);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_job_wait(JobHandle job, int timeoutMs);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_job_take_image(JobHandle job, IntPtr outRgba, UIntPtr outRgbaLen);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern int sdxl_job_take_latents(JobHandle job, IntPtr outLatents, UIntPtr outLatentsLen);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern void sdxl_job_free(IntPtr job);
    }
}
