// The C# / Unity API of libsdxl: SafeHandles, Model / CancelToken / Job, exceptions with the
// library's status and message, callbacks through static [MonoPInvokeCallback] trampolines.
using System;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using Microsoft.Win32.SafeHandles;
#if UNITY_5_3_OR_NEWER
using AOT;
#endif

namespace Sdxl
{
    /// <summary>A failed call: Status plus the library's detailed message.</summary>
    public class SdxlException : Exception
    {
        public SdxlException(Status status, string message) : base(status + ": " + message)
        {
            Status = status;
            Detail = message;
        }

        public Status Status { get; private set; }
        public string Detail { get; private set; }
        public bool IsCancelled { get { return Status == Status.Cancelled; } }

        /// <summary>Throws the calling thread's last error unless status is OK.</summary>
        internal static void Check(int status)
        {
            if (status == 0) return;
            var size = (int)Native.sdxl_last_error_message(null, UIntPtr.Zero);
            var message = Marshal.PtrToStringAnsi(Native.sdxl_status_str(status));
            if (size > 1)
            {
                var buf = new byte[size];
                Native.sdxl_last_error_message(buf, (UIntPtr)buf.Length);
                message = Encoding.UTF8.GetString(buf, 0, size - 1);
            }
            throw new SdxlException((Status)status, message);
        }
    }

    public sealed class ModelHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public ModelHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.sdxl_model_free(handle); return true; }
    }

    public sealed class CancelTokenHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public CancelTokenHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.sdxl_cancel_token_free(handle); return true; }
    }

    /// <summary>Owns a job and the GCHandle of its callbacks, freed after sdxl_job_free (which
    /// cancels and waits, so no callback runs afterwards).</summary>
    public sealed class JobHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        internal GCHandle Callbacks;
        public JobHandle() : base(true) { }

        internal JobHandle(IntPtr job, GCHandle callbacks) : base(true)
        {
            SetHandle(job);
            Callbacks = callbacks;
        }

        protected override bool ReleaseHandle()
        {
            Native.sdxl_job_free(handle);
            if (Callbacks.IsAllocated) Callbacks.Free();
            return true;
        }
    }

    /// <summary>Library-wide functions.</summary>
    public static class Library
    {
        /// <summary>The library's version string.</summary>
        public static string Version { get { return Marshal.PtrToStringAnsi(Native.sdxl_version()); } }

        /// <summary>Throws unless the loaded library has this binding's ABI version; call once
        /// at start-up.</summary>
        public static void CheckAbi()
        {
            var abi = Native.sdxl_abi_version();
            if (abi != Native.AbiVersion)
            {
                throw new SdxlException(Status.AbiMismatch, string.Format(
                    "libsdxl has ABI version {0}, this binding needs {1}", abi, Native.AbiVersion));
            }
        }

        static Action<LogLevel, string> logCallback;
        static readonly LogFn LogTrampoline = OnLog;

        [MonoPInvokeCallback(typeof(LogFn))]
        static void OnLog(int level, IntPtr message, IntPtr userData)
        {
            var callback = logCallback;
            if (callback == null) return;
            try { callback((LogLevel)level, Utf8.FromNative(message)); }
            catch (Exception) { /* never unwind into native code */ }
        }

        /// <summary>Installs the process-wide log callback (null = off). It may run on any
        /// thread.</summary>
        public static void SetLogCallback(Action<LogLevel, string> callback, LogLevel minLevel)
        {
            var fn = callback == null ? IntPtr.Zero : Marshal.GetFunctionPointerForDelegate(LogTrampoline);
            if (callback != null) logCallback = callback;
            SdxlException.Check(Native.sdxl_set_log_callback(fn, IntPtr.Zero, (int)minLevel));
            logCallback = callback;
        }
    }

    static class Utf8
    {
        /// <summary>A NUL-terminated UTF-8 copy in unmanaged memory (Zero for null); free it
        /// with Marshal.FreeHGlobal.</summary>
        public static IntPtr ToNative(string s)
        {
            if (s == null) return IntPtr.Zero;
            var bytes = Encoding.UTF8.GetBytes(s);
            var p = Marshal.AllocHGlobal(bytes.Length + 1);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            Marshal.WriteByte(p, bytes.Length, 0);
            return p;
        }

        public static string FromNative(IntPtr p)
        {
            if (p == IntPtr.Zero) return null;
            var n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }
    }

    /// <summary>A flag that stops the runs it is passed to; Cancel() works from any thread.</summary>
    public sealed class CancelToken : IDisposable
    {
        internal readonly CancelTokenHandle Handle;

        public CancelToken()
        {
            SdxlException.Check(Native.sdxl_cancel_token_new(out Handle));
        }

        public void Cancel() { SdxlException.Check(Native.sdxl_cancel_token_cancel(Handle)); }
        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>Called after every step; return true to stop the run.</summary>
    public delegate bool ProgressCallback(Stage stage, uint step, uint total, double seconds);

    /// <summary>Called after every step with an RGB preview (width * height * 3 bytes).</summary>
    public delegate void PreviewCallback(Stage stage, uint step, uint total, byte[] rgb, uint width, uint height);

    /// <summary>Everything one generation needs. Raw holds the C parameters with the library's
    /// defaults; the properties below set the common ones.</summary>
    public sealed class GenerateOptions
    {
        public GenerateParams Raw;
        public string Prompt = "";
        public string Prompt2;
        public string NegativePrompt;
        public string NegativePrompt2;
        /// <summary>Image-to-image: pixels in InitImageFormat, rows top to bottom.</summary>
        public byte[] InitImage;
        public Model Refiner;
        public CancelToken Cancel;
        /// <summary>Runs on the generating thread (a worker thread for jobs).</summary>
        public ProgressCallback Progress;
        public PreviewCallback Preview;

        public GenerateOptions()
        {
            SdxlException.Check(Native.sdxl_generate_params_init(ref Raw));
        }

        public int Width { get { return (int)Raw.width; } set { Raw.width = (uint)value; } }
        public int Height { get { return (int)Raw.height; } set { Raw.height = (uint)value; } }
        public int Steps { get { return (int)Raw.steps; } set { Raw.steps = (uint)value; } }
        public int NumImages { get { return (int)Raw.num_images; } set { Raw.num_images = (uint)value; } }
        public ulong Seed { get { return Raw.seed; } set { Raw.seed = value; } }
        public double GuidanceScale { get { return Raw.guidance_scale; } set { Raw.guidance_scale = value; } }
        public double Strength { get { return Raw.strength; } set { Raw.strength = value; } }
        public Scheduler Scheduler { get { return (Scheduler)Raw.scheduler; } set { Raw.scheduler = (int)value; } }
        public PixelFormat InitImageFormat
        {
            get { return (PixelFormat)Raw.init_image_format; }
            set { Raw.init_image_format = (int)value; }
        }

        /// <summary>Bytes of the RGBA8 output: Width * Height * 4 * NumImages.</summary>
        public int ImageSize
        {
            get
            {
                UIntPtr n;
                SdxlException.Check(Native.sdxl_generate_image_size(ref Raw, out n));
                return checked((int)n);
            }
        }
    }

    /// <summary>The managed side of one run's callbacks, reached through a GCHandle.</summary>
    sealed class CallbackState
    {
        public ProgressCallback Progress;
        public PreviewCallback Preview;
        public Exception Error;

        static readonly ProgressFn ProgressTrampoline = OnProgress;
        static readonly PreviewFn PreviewTrampoline = OnPreview;

        public static IntPtr ProgressPtr { get { return Marshal.GetFunctionPointerForDelegate(ProgressTrampoline); } }
        public static IntPtr PreviewPtr { get { return Marshal.GetFunctionPointerForDelegate(PreviewTrampoline); } }

        [MonoPInvokeCallback(typeof(ProgressFn))]
        static int OnProgress(int stage, uint step, uint total, double seconds, IntPtr user)
        {
            var state = (CallbackState)GCHandle.FromIntPtr(user).Target;
            try { return state.Progress((Stage)stage, step, total, seconds) ? 1 : 0; }
            catch (Exception e) { state.Error = state.Error ?? e; return 1; }
        }

        [MonoPInvokeCallback(typeof(PreviewFn))]
        static void OnPreview(int stage, uint step, uint total, IntPtr rgb, uint width, uint height, IntPtr user)
        {
            var state = (CallbackState)GCHandle.FromIntPtr(user).Target;
            try
            {
                var copy = new byte[checked((int)(width * height * 3))];
                Marshal.Copy(rgb, copy, 0, copy.Length);
                state.Preview((Stage)stage, step, total, copy, width, height);
            }
            catch (Exception e) { state.Error = state.Error ?? e; }
        }
    }

    /// <summary>Native resources of one call: UTF-8 strings, pins, handle references and the
    /// callbacks' GCHandle; Dispose releases them (in a finally).</summary>
    sealed class NativeCall : IDisposable
    {
        public GenerateParams Params;
        public GCHandle Callbacks;
        readonly IntPtr[] strings = new IntPtr[4];
        GCHandle initImage;
        SafeHandle refiner, cancel;

        public NativeCall(GenerateOptions o)
        {
            Params = o.Raw;
            try
            {
                Params.prompt = strings[0] = Utf8.ToNative(o.Prompt ?? "");
                Params.prompt_2 = strings[1] = Utf8.ToNative(o.Prompt2);
                Params.negative_prompt = strings[2] = Utf8.ToNative(o.NegativePrompt);
                Params.negative_prompt_2 = strings[3] = Utf8.ToNative(o.NegativePrompt2);
                if (o.InitImage != null)
                {
                    initImage = GCHandle.Alloc(o.InitImage, GCHandleType.Pinned);
                    Params.init_image = initImage.AddrOfPinnedObject();
                    Params.init_image_len = (UIntPtr)o.InitImage.Length;
                }
                if (o.Refiner != null) Params.refiner = AddRef(o.Refiner.Handle, ref refiner);
                if (o.Cancel != null) Params.cancel = AddRef(o.Cancel.Handle, ref cancel);
                if (o.Progress != null || o.Preview != null)
                {
                    Callbacks = GCHandle.Alloc(new CallbackState { Progress = o.Progress, Preview = o.Preview });
                    var user = GCHandle.ToIntPtr(Callbacks);
                    if (o.Progress != null) { Params.progress = CallbackState.ProgressPtr; Params.progress_user_data = user; }
                    if (o.Preview != null) { Params.preview = CallbackState.PreviewPtr; Params.preview_user_data = user; }
                }
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        static IntPtr AddRef(SafeHandle h, ref SafeHandle slot)
        {
            var added = false;
            h.DangerousAddRef(ref added);
            slot = h;
            return h.DangerousGetHandle();
        }

        /// <summary>Rethrows an exception a callback raised.</summary>
        public void RethrowCallbackError()
        {
            if (Callbacks.IsAllocated)
            {
                var error = ((CallbackState)Callbacks.Target).Error;
                if (error != null) throw new AggregateException("an sdxl callback threw", error);
            }
        }

        /// <summary>Hands the callbacks' GCHandle to a job, which frees it.</summary>
        public GCHandle TakeCallbacks()
        {
            var h = Callbacks;
            Callbacks = default(GCHandle);
            return h;
        }

        public void Dispose()
        {
            for (var i = 0; i < strings.Length; i++)
            {
                if (strings[i] != IntPtr.Zero) Marshal.FreeHGlobal(strings[i]);
                strings[i] = IntPtr.Zero;
            }
            if (initImage.IsAllocated) initImage.Free();
            if (Callbacks.IsAllocated) Callbacks.Free();
            if (refiner != null) { refiner.DangerousRelease(); refiner = null; }
            if (cancel != null) { cancel.DangerousRelease(); cancel = null; }
        }
    }

    /// <summary>A loaded SDXL base or refiner; read-only after loading, shareable by threads.</summary>
    public sealed class Model : IDisposable
    {
        internal readonly ModelHandle Handle;

        Model(ModelHandle handle) { Handle = handle; }

        /// <summary>Loads a diffusers folder (blocks while reading the weights).</summary>
        public static Model Load(string path, Device device = Device.Cpu, DType dtype = DType.F32)
        {
            Library.CheckAbi();
            var options = new LoadOptions();
            SdxlException.Check(Native.sdxl_load_options_init(ref options));
            options.device = (int)device;
            options.dtype = (int)dtype;
            var p = Utf8.ToNative(path);
            try
            {
                ModelHandle handle;
                SdxlException.Check(Native.sdxl_model_load(p, ref options, out handle));
                return new Model(handle);
            }
            finally
            {
                Marshal.FreeHGlobal(p);
            }
        }

        public ModelKind Kind
        {
            get
            {
                int kind;
                SdxlException.Check(Native.sdxl_model_kind(Handle, out kind));
                return (ModelKind)kind;
            }
        }

        /// <summary>Generates into `output` (options.ImageSize bytes of RGBA8, rows top to
        /// bottom), blocking; callbacks run on this thread.</summary>
        public void Generate(GenerateOptions options, byte[] output)
        {
            if (output == null) throw new ArgumentNullException("output");
            using (var call = new NativeCall(options))
            {
                var pin = GCHandle.Alloc(output, GCHandleType.Pinned);
                int status;
                try
                {
                    status = Native.sdxl_generate(Handle, ref call.Params, pin.AddrOfPinnedObject(),
                        (UIntPtr)output.Length, IntPtr.Zero, UIntPtr.Zero);
                }
                finally
                {
                    pin.Free();
                }
                call.RethrowCallbackError();
                SdxlException.Check(status);
            }
        }

        /// <summary>Generates and returns a new RGBA8 buffer.</summary>
        public byte[] Generate(GenerateOptions options)
        {
            var output = new byte[options.ImageSize];
            Generate(options, output);
            return output;
        }

        /// <summary>Starts the generation on a library worker thread and returns at once.</summary>
        public Job Start(GenerateOptions options)
        {
            using (var call = new NativeCall(options))
            {
                IntPtr job;
                SdxlException.Check(Native.sdxl_job_start(Handle, ref call.Params, out job));
                return new Job(new JobHandle(job, call.TakeCallbacks()), options.ImageSize);
            }
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>A generation on a library worker thread: poll it from a coroutine or await
    /// RunAsync; Dispose cancels and waits.</summary>
    public sealed class Job : IDisposable
    {
        readonly JobHandle handle;
        readonly int imageSize;

        internal Job(JobHandle handle, int imageSize)
        {
            this.handle = handle;
            this.imageSize = imageSize;
        }

        public JobProgress Poll()
        {
            var p = new JobProgress { struct_size = (uint)Marshal.SizeOf(typeof(JobProgress)) };
            SdxlException.Check(Native.sdxl_job_poll(handle, ref p));
            return p;
        }

        public bool IsDone { get { return Poll().Done; } }

        public void Cancel() { SdxlException.Check(Native.sdxl_job_cancel(handle)); }

        /// <summary>True once finished, false on timeout; throws the job's error.</summary>
        public bool Wait(int timeoutMs = -1)
        {
            var status = Native.sdxl_job_wait(handle, timeoutMs);
            if (status == (int)Status.Timeout) return false;
            RethrowCallbackError();
            SdxlException.Check(status);
            return true;
        }

        /// <summary>Copies the finished images into `output`; throws NotReady while running.</summary>
        public void TakeImage(byte[] output)
        {
            var pin = GCHandle.Alloc(output, GCHandleType.Pinned);
            try
            {
                SdxlException.Check(Native.sdxl_job_take_image(handle, pin.AddrOfPinnedObject(), (UIntPtr)output.Length));
            }
            finally
            {
                pin.Free();
            }
        }

        public byte[] TakeImage()
        {
            var output = new byte[imageSize];
            TakeImage(output);
            return output;
        }

        /// <summary>Polls until done without blocking a thread, then returns the images;
        /// cancelling `ct` cancels the job.</summary>
        public async Task<byte[]> RunAsync(CancellationToken ct = default(CancellationToken), int pollMs = 15)
        {
            using (ct.Register(Cancel))
            {
                while (!IsDone) await Task.Delay(pollMs).ConfigureAwait(false);
            }
            Wait(0);
            return TakeImage();
        }

        void RethrowCallbackError()
        {
            var state = handle.Callbacks.IsAllocated ? (CallbackState)handle.Callbacks.Target : null;
            if (state != null && state.Error != null) throw new AggregateException("an sdxl callback threw", state.Error);
        }

        public void Dispose() { handle.Dispose(); }
    }
}
