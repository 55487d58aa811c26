// The header compiles on its own as strict C++17: c++ -std=c++17 -Wall -Wextra -Wpedantic -Werror.
#include "sdxl.h"

int main() { return SDXL_STATUS_OK; }
