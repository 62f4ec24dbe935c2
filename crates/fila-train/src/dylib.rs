//! Shared libraries opened at run time (the `cuda` feature): the CUDA driver, NVRTC and NCCL are
//! looked for before anything uses them, so a missing one is an error that names it instead of
//! the panic inside cudarc's loader.

use std::ffi::{c_void, CStr, CString};

/// A library opened with `dlopen`; never closed (the functions taken from it live as long as the
/// process).
#[derive(Clone, Copy)]
pub struct Library {
    handle: *mut c_void,
    pub name: &'static str,
}

// SAFETY: a `dlopen` handle may be used from any thread.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

impl Library {
    /// Opens `name` (a file name looked up on the loader's path, or a path).
    pub fn open(name: &str) -> Result<Self, String> {
        let c = CString::new(name).map_err(|_| format!("`{name}` contains a NUL byte"))?;
        // SAFETY: a valid C string; the flags are plain constants.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(last_error());
        }
        Ok(Self { handle, name: Box::leak(name.to_owned().into_boxed_str()) })
    }

    /// The first of `names` that opens, or what each attempt said.
    pub fn open_first<S: AsRef<str>>(names: &[S]) -> Result<Self, Vec<String>> {
        let mut why = Vec::new();
        for n in names {
            match Self::open(n.as_ref()) {
                Ok(lib) => return Ok(lib),
                Err(e) => why.push(e),
            }
        }
        Err(why)
    }

    /// The address of the symbol `name`.
    pub fn symbol(&self, name: &str) -> Result<*mut c_void, String> {
        let c = CString::new(name).expect("symbol names have no NUL byte");
        // SAFETY: `handle` came from `dlopen` and is never closed.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        if p.is_null() {
            return Err(format!("{} has no `{name}`", self.name));
        }
        Ok(p)
    }

    /// The function `name` as the function pointer type `F`.
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` type with the symbol's C signature.
    pub unsafe fn function<F: Copy>(&self, name: &str) -> Result<F, String> {
        assert_eq!(size_of::<F>(), size_of::<*mut c_void>(), "a function pointer type");
        let p = self.symbol(name)?;
        Ok(std::mem::transmute_copy::<*mut c_void, F>(&p))
    }
}

fn last_error() -> String {
    // SAFETY: `dlerror` returns null or a C string valid until the next dl* call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_libraries_and_symbols_are_named() {
        let e = Library::open("/nonexistent/libnothing.so.1").err().unwrap();
        assert!(e.contains("/nonexistent/libnothing.so.1"), "{e}");
        let why = Library::open_first(&["libnothing-a.so", "libnothing-b.so"]).err().unwrap();
        assert_eq!(why.len(), 2);
        assert!(why[1].contains("libnothing-b.so"), "{why:?}");
        let c = Library::open_first(&["libnothing-a.so", "libc.so.6"]).ok().unwrap();
        assert_eq!(c.name, "libc.so.6");
        assert!(c.symbol("malloc").is_ok());
        assert_eq!(c.symbol("ncclGetUniqueId").unwrap_err(), "libc.so.6 has no `ncclGetUniqueId`");
    }
}
