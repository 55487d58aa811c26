#include "SdxlModule.h"

#include "HAL/PlatformProcess.h"
#include "Interfaces/IPluginManager.h"
#include "Misc/Paths.h"
#include "sdxl.h"

DEFINE_LOG_CATEGORY_STATIC(LogSdxl, Log, All);

void FSdxlModule::StartupModule()
{
#if defined(SDXL_LINKED)
	bAbiMatches = sdxl_abi_version() == SDXL_ABI_VERSION;
#else
	const TSharedPtr<IPlugin> Plugin = IPluginManager::Get().FindPlugin(TEXT("Sdxl"));
	if (!Plugin.IsValid())
	{
		UE_LOG(LogSdxl, Error, TEXT("Sdxl plugin not found"));
		return;
	}
	const FString Path = FPaths::Combine(Plugin->GetBaseDir(), TEXT("Binaries/ThirdParty"),
		FPlatformProcess::GetBinariesSubdirectory(), SDXL_LIBRARY_FILE);
	LibraryHandle = FPlatformProcess::GetDllHandle(*Path);
	if (LibraryHandle == nullptr)
	{
		UE_LOG(LogSdxl, Error, TEXT("Cannot load %s"), *Path);
		return;
	}
	// The library is loaded now, so the (delay-loaded) import resolves.
	bAbiMatches = sdxl_abi_version() == SDXL_ABI_VERSION;
#endif
	if (bAbiMatches)
	{
		UE_LOG(LogSdxl, Log, TEXT("%s"), UTF8_TO_TCHAR(sdxl_version()));
	}
	else
	{
		UE_LOG(LogSdxl, Error, TEXT("libsdxl has ABI version %u, the plugin was built for %u"),
			sdxl_abi_version(), static_cast<uint32>(SDXL_ABI_VERSION));
	}
}

void FSdxlModule::ShutdownModule()
{
	// Free every sdxl::Model/Job before this (jobs run on library threads).
	if (LibraryHandle != nullptr)
	{
		FPlatformProcess::FreeDllHandle(LibraryHandle);
		LibraryHandle = nullptr;
	}
	bAbiMatches = false;
}

bool FSdxlModule::IsAvailable()
{
	const FSdxlModule* Module = FModuleManager::GetModulePtr<FSdxlModule>(TEXT("Sdxl"));
	return Module != nullptr && Module->bAbiMatches;
}

IMPLEMENT_MODULE(FSdxlModule, Sdxl)
