//! Code tables both ends and every client share: IEEE 11073-10101 (MDC) codes of the numerics
//! and ECG leads the relay produces, with their UCUM units. The numbers are the MDC "context
//! free" codes (partition 2 "SCADA": 65536 * 2 + term code).

/// MDC_ECG_HEART_RATE, in `/min`.
pub const ECG_HEART_RATE: u32 = 147_842;
/// MDC_PULS_OXIM_SAT_O2, in `%`.
pub const PULS_OXIM_SAT_O2: u32 = 150_456;
/// MDC_PRESS_BLD_NONINV_SYS, in `mm[Hg]`.
pub const PRESS_BLD_NONINV_SYS: u32 = 150_021;
/// MDC_PRESS_BLD_NONINV_DIA, in `mm[Hg]`.
pub const PRESS_BLD_NONINV_DIA: u32 = 150_022;
/// MDC_PRESS_BLD_NONINV_MEAN, in `mm[Hg]`.
pub const PRESS_BLD_NONINV_MEAN: u32 = 150_023;
/// MDC_RESP_RATE, in `/min`.
pub const RESP_RATE: u32 = 151_562;
/// MDC_AWAY_CO2_ET, in `mm[Hg]`.
pub const AWAY_CO2_ET: u32 = 151_708;
/// MDC_TEMP_BODY, in `Cel`.
pub const TEMP_BODY: u32 = 150_364;
/// MDC_ECG_ELEC_POTL: an ECG lead of unspecified placement (e.g. modified leads).
pub const ECG_ELEC_POTL: u32 = 131_328;

/// UCUM unit of the numerics above, where the relay knows one.
pub fn ucum_unit(mdc_code: u32) -> Option<&'static str> {
    Some(match mdc_code {
        ECG_HEART_RATE | RESP_RATE => "/min",
        PULS_OXIM_SAT_O2 => "%",
        PRESS_BLD_NONINV_SYS | PRESS_BLD_NONINV_DIA | PRESS_BLD_NONINV_MEAN | AWAY_CO2_ET => {
            "mm[Hg]"
        }
        TEMP_BODY => "Cel",
        _ => return None,
    })
}

/// MDC code of a standard ECG lead name (case-insensitive), or [`ECG_ELEC_POTL`] for any other.
pub fn ecg_lead(name: &str) -> u32 {
    let term = match name.to_ascii_lowercase().as_str() {
        "i" => 1,
        "ii" => 2,
        "v1" => 3,
        "v2" => 4,
        "v3" => 5,
        "v4" => 6,
        "v5" => 7,
        "v6" => 8,
        "iii" => 61,
        "avr" => 62,
        "avl" => 63,
        "avf" => 64,
        _ => return ECG_ELEC_POTL,
    };
    ECG_ELEC_POTL + term
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leads_and_units() {
        assert_eq!(ecg_lead("I"), 131_329);
        assert_eq!(ecg_lead("v6"), 131_336);
        assert_eq!(ecg_lead("aVF"), 131_392);
        assert_eq!(ecg_lead("MLII"), ECG_ELEC_POTL);
        assert_eq!(ucum_unit(PRESS_BLD_NONINV_MEAN), Some("mm[Hg]"));
        assert_eq!(ucum_unit(TEMP_BODY), Some("Cel"));
        assert_eq!(ucum_unit(1), None);
    }
}
