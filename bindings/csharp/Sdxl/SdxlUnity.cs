// Unity helpers: run a job from a coroutine and hand the result to the main thread as a
// Texture2D. Compiled only inside Unity.
#if UNITY_5_3_OR_NEWER
using System;
using System.Collections;
using UnityEngine;

namespace Sdxl
{
    public static class SdxlUnity
    {
        /// <summary>A Texture2D from RGBA8 rows top to bottom (Unity's rows go bottom-up, so
        /// they are flipped). Call on the main thread.</summary>
        public static Texture2D ToTexture2D(byte[] rgba, int width, int height, int image = 0)
        {
            var rowBytes = width * 4;
            var flipped = new byte[rowBytes * height];
            var start = image * rowBytes * height;
            for (var y = 0; y < height; y++)
            {
                Buffer.BlockCopy(rgba, start + (height - 1 - y) * rowBytes, flipped, y * rowBytes, rowBytes);
            }
            var texture = new Texture2D(width, height, TextureFormat.RGBA32, false);
            texture.LoadRawTextureData(flipped);
            texture.Apply();
            return texture;
        }

        /// <summary>Starts `options` as a job and polls it once per frame; on the main thread,
        /// calls `done` with the first image as a texture, or `failed` with the error. Stopping
        /// the coroutine disposes the job (which cancels it).
        ///   StartCoroutine(SdxlUnity.Generate(model, options, t => image.texture = t, Debug.LogException));
        /// </summary>
        public static IEnumerator Generate(Model model, GenerateOptions options, Action<Texture2D> done,
            Action<Exception> failed, Action<JobProgress> progress = null)
        {
            Job job;
            try { job = model.Start(options); }
            catch (Exception e) { failed(e); yield break; }
            using (job)
            {
                while (true)
                {
                    var p = job.Poll();
                    if (progress != null) progress(p);
                    if (p.Done) break;
                    yield return null;
                }
                byte[] rgba = null;
                Exception error = null;
                try
                {
                    job.Wait(0);
                    rgba = job.TakeImage();
                }
                catch (Exception e) { error = e; }
                if (error != null) failed(error);
                else done(ToTexture2D(rgba, options.Width, options.Height));
            }
        }
    }
}
#endif
