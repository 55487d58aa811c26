/* The header compiles on its own as strict C11: cc -std=c11 -Wall -Wextra -Wpedantic -Werror. */
#include "sdxl.h"

int main(void) { return SDXL_STATUS_OK; }
