// Links libsdxl. Layout inside the plugin (install.sh fills it):
//   Source/ThirdParty/SdxlLibrary/include/sdxl.h
//   Binaries/ThirdParty/<Platform>/  sdxl.dll + sdxl.dll.lib (Win64), libsdxl.so (Linux),
//                                    libsdxl.dylib (Mac), libsdxl.a (IOS),
//                                    <abi>/libsdxl.so (Android: arm64-v8a, x86_64)
using System.IO;
using UnrealBuildTool;

public class Sdxl : ModuleRules
{
    public Sdxl(ReadOnlyTargetRules Target) : base(Target)
    {
        PCHUsage = PCHUsageMode.UseExplicitOrSharedPCHs;
        PublicDependencyModuleNames.AddRange(new[] { "Core", "CoreUObject", "Engine" });
        PrivateDependencyModuleNames.AddRange(new[] { "Projects" });

        string PluginDir = Path.GetFullPath(Path.Combine(ModuleDirectory, "..", ".."));
        PublicIncludePaths.Add(Path.Combine(PluginDir, "Source", "ThirdParty", "SdxlLibrary", "include"));
        string Bin = Path.Combine(PluginDir, "Binaries", "ThirdParty", Target.Platform.ToString());

        if (Target.Platform == UnrealTargetPlatform.Win64)
        {
            PublicAdditionalLibraries.Add(Path.Combine(Bin, "sdxl.dll.lib"));
            PublicDelayLoadDLLs.Add("sdxl.dll");          // loaded by FSdxlModule::StartupModule
            RuntimeDependencies.Add(Path.Combine(Bin, "sdxl.dll"));
            PublicDefinitions.Add("SDXL_LIBRARY_FILE=TEXT(\"sdxl.dll\")");
        }
        else if (Target.Platform == UnrealTargetPlatform.Mac)
        {
            PublicDelayLoadDLLs.Add(Path.Combine(Bin, "libsdxl.dylib"));
            RuntimeDependencies.Add(Path.Combine(Bin, "libsdxl.dylib"));
            PublicDefinitions.Add("SDXL_LIBRARY_FILE=TEXT(\"libsdxl.dylib\")");
        }
        else if (Target.Platform == UnrealTargetPlatform.Linux)
        {
            PublicAdditionalLibraries.Add(Path.Combine(Bin, "libsdxl.so"));
            RuntimeDependencies.Add(Path.Combine(Bin, "libsdxl.so"));
            PublicDefinitions.Add("SDXL_LIBRARY_FILE=TEXT(\"libsdxl.so\")");
        }
        else if (Target.Platform == UnrealTargetPlatform.Android)
        {
            foreach (string Abi in new[] { "arm64-v8a", "x86_64" })
            {
                PublicAdditionalLibraries.Add(Path.Combine(Bin, Abi, "libsdxl.so"));
            }
            // Linked (DT_NEEDED); stage the .so into the APK with an APL file (see README).
            PublicDefinitions.Add("SDXL_LINKED=1");
        }
        else if (Target.Platform == UnrealTargetPlatform.IOS)
        {
            PublicAdditionalLibraries.Add(Path.Combine(Bin, "libsdxl.a"));   // static: nothing to load
            PublicFrameworks.AddRange(new[] { "Metal", "Accelerate" });
            PublicDefinitions.Add("SDXL_LINKED=1");
        }
    }
}
