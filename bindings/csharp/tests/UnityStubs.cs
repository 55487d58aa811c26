// The few UnityEngine/AOT types the binding uses, so that CI can type-check the
// UNITY_5_3_OR_NEWER code paths (mcs -define:UNITY_5_3_OR_NEWER) without Unity installed.
// Not part of the binding: Unity provides the real ones.
using System;

namespace AOT
{
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type type) { }
    }
}

namespace UnityEngine
{
    public enum TextureFormat { RGBA32 = 4 }

    public class Texture2D
    {
        public Texture2D(int width, int height, TextureFormat format, bool mipChain) { }
        public void LoadRawTextureData(byte[] data) { }
        public void Apply() { }
    }
}
