// Smoke test of the C# binding under mono:
//   mono smoke.exe MODEL_DIR LAYOUT_JSON [WIDTH HEIGHT STEPS]
// LAYOUT_JSON is the output of tests/c/layout.c. Prints one line per check and
// "N passed, M failed"; exits non-zero on any failure.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using System.Threading;
using Sdxl;

static class Smoke
{
    static int passed, failed;

    static void Check(bool ok, string what)
    {
        Console.WriteLine((ok ? "ok   " : "FAIL ") + what);
        if (ok) passed++; else failed++;
    }

    static Status StatusOf(Action action)
    {
        try { action(); return Status.Ok; }
        catch (SdxlException e) { Console.WriteLine("     " + e.Message); return e.Status; }
    }

    static readonly Dictionary<string, Type> Structs = new Dictionary<string, Type>
    {
        { "sdxl_load_options", typeof(LoadOptions) },
        { "sdxl_generate_params", typeof(GenerateParams) },
        { "sdxl_job_progress", typeof(JobProgress) },
    };

    /// Compares Marshal.SizeOf/OffsetOf of every struct with the C compiler's layout.
    static void CheckLayout(string json)
    {
        var abi = Regex.Match(json, "\"abi_version\":\\s*(\\d+)");
        Check(abi.Success && uint.Parse(abi.Groups[1].Value) == Native.AbiVersion, "layout ABI version");
        var structs = Regex.Matches(json, "\"(\\w+)\":\\s*\\{\"size\":\\s*(\\d+),\\s*\"align\":\\s*\\d+,\\s*\"fields\":\\s*\\{([^}]*)\\}");
        Check(structs.Count == Structs.Count, "layout lists " + structs.Count + " structs");
        foreach (Match s in structs)
        {
            var name = s.Groups[1].Value;
            Type type;
            if (!Structs.TryGetValue(name, out type)) { Check(false, "unknown struct " + name); continue; }
            var ok = Marshal.SizeOf(type) == int.Parse(s.Groups[2].Value);
            var fields = Regex.Matches(s.Groups[3].Value, "\"(\\w+)\":\\s*(\\d+)");
            ok &= fields.Count == type.GetFields().Length;
            foreach (Match f in fields)
            {
                ok &= (int)Marshal.OffsetOf(type, f.Groups[1].Value) == int.Parse(f.Groups[2].Value);
            }
            Check(ok, string.Format("{0}: size {1} and {2} field offsets match C", name, s.Groups[2].Value, fields.Count));
        }
    }

    static bool Filled(byte[] rgba)
    {
        var varied = false;
        for (var i = 0; i < rgba.Length; i += 4)
        {
            if (rgba[i + 3] != 255) return false;
            varied |= rgba[i] != rgba[0];
        }
        return varied;
    }

    static int Main(string[] args)
    {
        if (args.Length != 2 && args.Length != 5)
        {
            Console.Error.WriteLine("usage: smoke.exe MODEL_DIR LAYOUT_JSON [WIDTH HEIGHT STEPS]");
            return 2;
        }
        var width = args.Length == 5 ? int.Parse(args[2]) : 64;
        var height = args.Length == 5 ? int.Parse(args[3]) : 64;
        var steps = args.Length == 5 ? int.Parse(args[4]) : 4;
        Console.WriteLine(Library.Version);
        Library.CheckAbi();
        CheckLayout(File.ReadAllText(args[1]));

        var logs = 0;
        Library.SetLogCallback((level, message) => Interlocked.Increment(ref logs), LogLevel.Info);
        Check(StatusOf(() => Model.Load(Path.Combine(args[0], "no-such-folder"))) == Status.Io, "missing folder gives Io");
        using (var model = Model.Load(args[0]))
        {
            Library.SetLogCallback(null, LogLevel.Info);
            Check(logs > 0, "log callback received " + logs + " messages");
            Check(model.Kind == ModelKind.Base, "kind is base");
            Func<GenerateOptions> options = () => new GenerateOptions
            {
                Prompt = "a red fox", NegativePrompt = "blurry", Width = width, Height = height, Steps = steps, Seed = 5,
            };

            // Blocking generation into a caller buffer, with progress.
            var o = options();
            var calls = 0;
            o.Progress = (stage, step, total, seconds) => { calls++; return false; };
            var image = new byte[o.ImageSize];
            model.Generate(o, image);
            Check(image.Length == width * height * 4 && Filled(image), "image filled, alpha 255");
            Check(calls == steps, "progress called " + calls + " times");

            // A progress callback returning true stops the run.
            var stop = options();
            stop.Progress = (stage, step, total, seconds) => step >= 1;
            Check(StatusOf(() => model.Generate(stop)) == Status.Cancelled, "progress callback cancels");

            // A cancel token from another thread during the run.
            using (var token = new CancelToken())
            {
                var firstStep = new ManualResetEventSlim();
                var cancelled = new ManualResetEventSlim();
                var t = options();
                t.Cancel = token;
                t.Progress = (stage, step, total, seconds) =>
                {
                    if (step == 1) { firstStep.Set(); cancelled.Wait(30000); }
                    return false;
                };
                var canceller = new Thread(() => { firstStep.Wait(30000); token.Cancel(); cancelled.Set(); });
                canceller.Start();
                Check(StatusOf(() => model.Generate(t)) == Status.Cancelled, "token cancelled from another thread");
                canceller.Join();
            }

            // A job awaited through RunAsync gives the blocking result; previews arrive.
            var previews = 0;
            var j = options();
            j.Preview = (stage, step, total, rgb, w, h) => Interlocked.Increment(ref previews);
            using (var job = model.Start(j))
            {
                var result = job.RunAsync().Result;
                var p = job.Poll();
                Check(p.Done && p.status == 0 && p.step == steps, "job done after " + p.step + " steps");
                var same = result.Length == image.Length;
                for (var i = 0; same && i < image.Length; i++) same = result[i] == image[i];
                Check(same, "job image equals the blocking one");
                Check(previews == steps, "preview called " + previews + " times");
            }

            // A job cancelled while it runs.
            {
                var firstStep = new ManualResetEventSlim();
                var cancelled = new ManualResetEventSlim();
                var s = options();
                s.Progress = (stage, step, total, seconds) =>
                {
                    if (step == 1) { firstStep.Set(); cancelled.Wait(30000); }
                    return false;
                };
                using (var job = model.Start(s))
                {
                    firstStep.Wait(30000);
                    job.Cancel();
                    cancelled.Set();
                    Check(StatusOf(() => job.Wait()) == Status.Cancelled, "job cancelled");
                    Check(StatusOf(() => job.TakeImage()) == Status.Cancelled, "no image after cancel");
                }
            }

            // Errors carry the status and the message.
            var bad = options();
            bad.Width = 7;
            try { model.Generate(bad, new byte[7 * height * 4]); Check(false, "bad width fails"); }
            catch (SdxlException e)
            {
                Check(e.Status == Status.InvalidArgument && e.Detail.Contains("width"), "bad width: " + e.Detail);
            }
        }
        Console.WriteLine("{0} passed, {1} failed", passed, failed);
        return failed == 0 ? 0 : 1;
    }
}
