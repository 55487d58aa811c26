// The plugin's module: loads libsdxl at start-up and checks its ABI version.
#pragma once

#include "Modules/ModuleManager.h"

class SDXL_API FSdxlModule : public IModuleInterface
{
public:
	virtual void StartupModule() override;
	virtual void ShutdownModule() override;

	/** True when libsdxl is loaded and speaks this header's ABI: check before any sdxl call. */
	static bool IsAvailable();

private:
	void* LibraryHandle = nullptr;
	bool bAbiMatches = false;
};
