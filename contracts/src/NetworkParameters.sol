// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title The economic parameters no other contract holds, owned by the governance timelock
/// @notice Coordinators read these at each epoch close and apply them to the next epoch. A
///         parameter never set by governance reads as "unset": coordinators then keep their
///         own config value, so deploying this contract changes nothing until a vote does.
/// @dev Every setter is bounded (a captured vote still cannot set a 100% take or an unbounded
///      emission) and bumps `version`, so a reader can tell cheaply whether anything moved.
contract NetworkParameters is Ownable {
    uint16 public constant MAX_TAKE_BPS = 5_000;
    uint256 public constant MAX_TIERS = 16;
    uint256 public constant MAX_EMISSION_SOGNI = 1_000_000_000;
    uint16 public constant MAX_VERIFICATION_BPS = 10_000;

    uint8 private constant _TAKE = 1;
    uint8 private constant _EMISSION = 2;
    uint8 private constant _VERIFICATION = 4;

    uint16[] private _takeRatesBps;
    /// @notice Whole SOGNI an epoch may pay for free (Daily Boost) work.
    uint256 public emissionBudgetSogni;
    /// @notice Share of jobs re-checked by independent verifiers, in basis points.
    uint16 public verificationRateBps;
    /// @notice Bit set of parameters governance has set (1 take rates, 2 emission, 4 verification).
    uint8 public setMask;
    /// @notice Bumped by every change.
    uint64 public version;

    event TakeRatesSet(uint16[] takeRatesBps, uint64 version);
    event EmissionBudgetSet(uint256 sogni, uint64 version);
    event VerificationRateSet(uint16 bps, uint64 version);

    error TakeRateTooHigh(uint256 bps, uint256 max);
    error EmissionBudgetTooHigh(uint256 sogni, uint256 max);
    error VerificationRateTooHigh(uint256 bps, uint256 max);
    error BadTierCount(uint256 count);

    constructor(address timelock) Ownable(timelock) {}

    /// @notice Take rate per stake tier (tier 0 first), each at most MAX_TAKE_BPS.
    function setTakeRates(uint16[] calldata ratesBps) external onlyOwner {
        if (ratesBps.length == 0 || ratesBps.length > MAX_TIERS) revert BadTierCount(ratesBps.length);
        for (uint256 i = 0; i < ratesBps.length; i++) {
            if (ratesBps[i] > MAX_TAKE_BPS) revert TakeRateTooHigh(ratesBps[i], MAX_TAKE_BPS);
        }
        _takeRatesBps = ratesBps;
        setMask |= _TAKE;
        emit TakeRatesSet(ratesBps, ++version);
    }

    function setEmissionBudget(uint256 sogni) external onlyOwner {
        if (sogni > MAX_EMISSION_SOGNI) revert EmissionBudgetTooHigh(sogni, MAX_EMISSION_SOGNI);
        emissionBudgetSogni = sogni;
        setMask |= _EMISSION;
        emit EmissionBudgetSet(sogni, ++version);
    }

    function setVerificationRate(uint16 bps) external onlyOwner {
        if (bps > MAX_VERIFICATION_BPS) revert VerificationRateTooHigh(bps, MAX_VERIFICATION_BPS);
        verificationRateBps = bps;
        setMask |= _VERIFICATION;
        emit VerificationRateSet(bps, ++version);
    }

    function takeRatesBps() external view returns (uint16[] memory) {
        return _takeRatesBps;
    }

    /// @notice Everything in one call: what a coordinator reads at epoch close.
    function snapshot()
        external
        view
        returns (uint64 version_, uint8 setMask_, uint16[] memory takeRates, uint256 emission, uint16 verification)
    {
        return (version, setMask, _takeRatesBps, emissionBudgetSogni, verificationRateBps);
    }
}
