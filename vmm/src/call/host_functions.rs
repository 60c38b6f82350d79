//! Host functions: typed closures the guest calls by name.

use std::collections::HashMap;
use std::sync::Arc;

use sandcore_abi::encoding::Value as WireValue;

use super::values::{FromValue, IntoValue, Value};

/// Result of a host function as the guest receives it: a value, or an error
/// message that the guest receives with status `HostFunctionFailed`.
pub type HostResult = Result<Value, String>;

/// A type-erased host function.
pub type DynHostFunction = dyn Fn(&[WireValue<'_>]) -> HostResult + Send + Sync;

/// Return type of a host closure: a value, or `Result<value, error>` whose
/// error text is sent to the guest.
pub trait HostReturn {
    /// Converts into the guest-visible result.
    fn into_host_result(self) -> HostResult;
}

macro_rules! host_return {
    ($($ty:ty),*) => {$(
        impl HostReturn for $ty {
            fn into_host_result(self) -> HostResult { Ok(self.into_value()) }
        }
    )*};
}
host_return!(
    (),
    i32,
    u32,
    i64,
    u64,
    f32,
    f64,
    bool,
    String,
    Vec<u8>,
    Value
);

impl<T: IntoValue, E: std::fmt::Display> HostReturn for Result<T, E> {
    fn into_host_result(self) -> HostResult {
        self.map(IntoValue::into_value)
            .map_err(|error| error.to_string())
    }
}

/// A closure usable as a host function, for a given parameter tuple.
pub trait HostFunction<Parameters>: Send + Sync + 'static {
    /// Erases the parameter types.
    fn into_dyn(self) -> Arc<DynHostFunction>;
}

fn argument<T: FromValue>(arguments: &[WireValue<'_>], index: usize) -> Result<T, String> {
    let value = arguments[index];
    T::from_wire(value).ok_or_else(|| {
        format!(
            "argument {index} has type {}, expected {}",
            value.value_type().name(),
            T::TYPE_NAME
        )
    })
}

macro_rules! host_function_arity {
    ($count:expr; $($name:ident . $index:tt),*) => {
        impl<Func, Ret, $($name: FromValue),*> HostFunction<($($name,)*)> for Func
        where
            Func: Fn($($name),*) -> Ret + Send + Sync + 'static,
            Ret: HostReturn,
        {
            #[allow(unused_variables)]
            fn into_dyn(self) -> Arc<DynHostFunction> {
                Arc::new(move |arguments: &[WireValue<'_>]| {
                    if arguments.len() != $count {
                        return Err(format!("{} arguments given, the host function takes {}", arguments.len(), $count));
                    }
                    self($(argument::<$name>(arguments, $index)?),*).into_host_result()
                })
            }
        }
    };
}
host_function_arity!(0;);
host_function_arity!(1; A.0);
host_function_arity!(2; A.0, B.1);
host_function_arity!(3; A.0, B.1, C.2);
host_function_arity!(4; A.0, B.1, C.2, D.3);
host_function_arity!(5; A.0, B.1, C.2, D.3, E.4);

/// Host functions of a sandbox by name.
#[derive(Clone, Default)]
pub struct HostFunctions {
    functions: HashMap<String, Arc<DynHostFunction>>,
}

impl HostFunctions {
    /// Registers `function` under `name`, replacing an earlier one.
    pub fn insert(&mut self, name: &str, function: Arc<DynHostFunction>) {
        self.functions.insert(name.to_owned(), function);
    }

    /// Looks a function up by name.
    pub fn get(&self, name: &str) -> Option<&Arc<DynHostFunction>> {
        self.functions.get(name)
    }
}

impl std::fmt::Debug for HostFunctions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.functions.keys()).finish()
    }
}
