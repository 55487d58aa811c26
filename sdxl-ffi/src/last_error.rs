//! The calling thread's last detailed error message.

use std::cell::RefCell;
use std::ffi::c_char;

use crate::guard::catch;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Stores `message` as this thread's last error.
pub(crate) fn set(message: &str) {
    // During thread teardown the slot may be gone; the message is then dropped.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut s) = slot.try_borrow_mut() {
            s.clear();
            s.push_str(message);
        }
    });
}

/// This thread's last error message (empty when none).
pub(crate) fn get() -> String {
    LAST_ERROR
        .try_with(|slot| slot.try_borrow().map(|s| s.clone()).unwrap_or_default())
        .unwrap_or_default()
}

/// Copies `message` into `buf` (at most `len` bytes including the terminating NUL, cut short if
/// needed) and returns the size the whole message needs including its NUL.
///
/// # Safety
/// `buf` must be NULL or valid for writes of `len` bytes.
unsafe fn copy_out(message: &str, buf: *mut c_char, len: usize) -> usize {
    let bytes = message.as_bytes();
    let needed = bytes.len() + 1;
    if !buf.is_null() && len > 0 {
        let n = bytes.len().min(len - 1);
        // SAFETY: the caller guarantees `buf` holds `len` bytes and `n + 1 <= len`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    needed
}

/// Copies the calling thread's last detailed error message into `buf` and returns the size it
/// needs, including the terminating NUL.
///
/// Every call that fails (returns a status other than `SDXL_STATUS_OK`) stores a message naming
/// the problem for its thread; successful calls leave the message as it was. With no failure so
/// far the message is empty (the function returns 1).
///
/// At most `len` bytes are written, always NUL-terminated when `len > 0`; a message that does not
/// fit is cut short, and the return value is then larger than `len`. Pass `buf = NULL` and
/// `len = 0` to query the size. Returns 0 only if the library panicked (it never should).
///
/// Thread-safe: each thread has its own message.
///
/// # Safety
/// `buf` must be NULL or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sdxl_last_error_message(buf: *mut c_char, len: usize) -> usize {
    let message = get();
    // SAFETY: forwarded from the caller.
    catch(|| unsafe { copy_out(&message, buf, len) }).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_truncates_and_reports_the_needed_size() {
        let mut buf = [0x7f as c_char; 8];
        // SAFETY: buf holds 8 bytes.
        let needed = unsafe { copy_out("hello world", buf.as_mut_ptr(), buf.len()) };
        assert_eq!(needed, 12);
        let got: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
        assert_eq!(&got, b"hello w\0");
        // SAFETY: NULL is allowed.
        assert_eq!(unsafe { copy_out("abc", std::ptr::null_mut(), 0) }, 4);
        // SAFETY: a zero-length buffer is never written.
        assert_eq!(unsafe { copy_out("abc", buf.as_mut_ptr(), 0) }, 4);
    }

    #[test]
    fn message_is_per_thread() {
        set("main thread failure");
        let other = std::thread::spawn(get).join().unwrap_or_default();
        assert_eq!(other, "");
        assert_eq!(get(), "main thread failure");
    }
}
